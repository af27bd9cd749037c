"""``inference-cache bench routing``: trace-replay simulation of routers over simulated
replicas in virtual time (issue #6). ``ours`` is the ext_proc server's own scorer.

Modules, in data-flow order: ``trace`` (workloads), ``engine`` (one simulated vLLM replica),
``routers`` (the routers and the view they decide from), ``sim`` (the event loop and the
references), ``bench`` (the CLI entry, table and JSON)."""
