"""The public surface of ``inference_cache.render`` is exactly ``__all__`` (sorted)."""

from inference_cache import render


def test_all_is_sorted_and_complete() -> None:
    assert render.__all__ == sorted(render.__all__)
    module = type(render)
    exported = {n for n, v in vars(render).items() if not n.startswith("_") and not isinstance(v, module)}
    assert exported == set(render.__all__)


def test_no_grpc_or_kubernetes_imports() -> None:
    import ast
    from pathlib import Path

    for path in Path(render.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in modules:
                assert not name.startswith(("grpc", "kubernetes", "kopf")), (path, name)
                if name.startswith("inference_cache."):
                    allowed = ("inference_cache.render", "inference_cache.index.fingerprint")
                    assert name.startswith(allowed), (path, name)
