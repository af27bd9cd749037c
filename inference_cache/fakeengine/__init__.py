"""A simulated vLLM replica: the ``inference-cache fake-engine`` subcommand.

Owner: ``inference_cache.fakeengine``. It stands where a vLLM pod stands in the data flow:
it serves the OpenAI-compatible HTTP API (``app``), keeps a prefix cache with vLLM v1
semantics (``prefix_cache``, hashes from ``hashing``), runs requests through a time model
(``scheduler``) and publishes KV events over ZMQ byte-identical to the emulated vLLM version
(``events`` encodes, ``publisher`` sends and replays). Tests, demos and benchmarks point the
router and the ``subscribe`` sidecar at it instead of a GPU.
"""
