"""The cluster cache-state index and the KV-event ingestion that feeds it.

Owner: ``inference-cache serve`` (and the ``subscribe`` sidecar, which reuses the
ingest code in the engine pod). Soft state: losing it causes cache misses, never wrong
answers. The package is decoupled from the wire: it imports neither grpc nor the
generated stubs; the server translates wire messages into ``index.types``.

Modules, in data-flow order:
- ``fingerprint``  our content-fingerprint block keys (hash scheme ``vllm``)
- ``kvevents``     engine KV-event decoding (vLLM every release, SGLang), sequence
                   tracking/replay over ZMQ, engine-hash to fingerprint mapping
- ``store``        the index itself: ingest, events, lookup and ranking, eviction
- ``policy``       per-namespace policy and per-tenant quotas (domain types)
- ``snapshot``     the ``/snapshot`` aggregate
- ``types``        domain types shared by all of the above
"""
