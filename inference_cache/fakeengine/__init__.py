"""A simulated vLLM replica (being written)."""
