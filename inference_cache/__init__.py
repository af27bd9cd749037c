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


def _extend_path_for_source_checkout() -> None:
    """Make ``python -m inference_cache`` work from the repository root.

    There, the current directory comes first on ``sys.path`` and this folder is imported
    as ``inference_cache`` instead of the installed package, but the subpackages live
    beside it (``index/``, ``extproc/``, ...). Only in a source checkout (recognised by
    ``pyproject.toml`` and ``index/`` next to this folder) is the repository root added
    to this package's ``__path__``; an installed wheel is left untouched.
    """
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "index")):
        __path__.append(root)


_extend_path_for_source_checkout()
