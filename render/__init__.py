"""The prompt-template engine: PromptTemplate stable/mutable slots to stable cache keys.

Owner: the server's RenderTemplate RPC and the ext_proc template path. A leaf library:
it imports no other ``inference_cache`` package, no gRPC and no Kubernetes client.
Nothing is implemented yet (issue #8); no placeholder API is exported until then.
"""

__all__: list[str] = []
