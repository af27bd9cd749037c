"""The request path: the ``InferenceCache`` gRPC API, the HTTP surface of
``inference-cache serve`` and (issue #4) the Envoy ``ext_proc`` endpoint picker.

Owner: ``inference-cache serve``. Translates wire messages (protobuf, JSON) into
``inference_cache.index`` domain types and back; holds no cache state of its own.
"""
