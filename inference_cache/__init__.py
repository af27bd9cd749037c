"""inference-cache: a Kubernetes-native cache plane for LLM inference.

One import namespace; each subpackage is a top-level folder of the repository:

- ``inference_cache.index``   the cluster cache-state index and KV-event ingestion (soft state)
- ``inference_cache.extproc`` the request path: InferenceCache gRPC API and (later) Envoy ext_proc
- ``inference_cache.render``  the prompt-template engine (leaf library)
- ``inference_cache.operator`` the kopf operator
- ``inference_cache.proto``   the generated gRPC contract

This package itself holds the composition roots: the CLI and the serve configuration.
"""

__version__ = "0.1.0"
