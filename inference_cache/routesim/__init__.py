"""``inference-cache bench routing``: trace-replay simulation of routers over simulated
replicas in virtual time (issue #6). ``ours`` is the ext_proc server's own scorer."""
