"""Engine KV-event ingestion: ZMQ stream -> typed events -> our fingerprint keys -> a sink.

Owner: ``inference_cache.index``. Used by ``inference-cache serve`` (sink = the
``Index``) and by the ``subscribe`` sidecar in the engine pod (sink = a gRPC forwarder),
so token ids never have to leave the pod.

Modules, in data-flow order:
- ``config``      ``EndpointConfig``: one engine endpoint (replica, model, sockets, ranks)
- ``decode``      bytes -> ``EventBatch`` for every released vLLM format and SGLang 0.5.x;
                  ZMQ frame splitting (live and replay shapes); ``EventDecodeError``
- ``mapper``      engine hashes -> our keys per (replica, rank), filters, refcounts;
                  ``BlockSink`` is the protocol it feeds
- ``subscriber``  asyncio SUB/DEALER client: sequence tracking, replay, resync, reconnect
- ``counters``    plain counters the server exports as Prometheus metrics
"""
