"""What the cyclic GC would walk: long-lived structures must hold only ints, bytes and
strings in untracked dicts, or every full collection visits each of their items (one cache
miss apiece, inline in whatever request the event loop was serving)."""

from __future__ import annotations

import gc
from collections.abc import Callable


def tracked_growth(work: Callable[[], object]) -> int:
    """GC-tracked objects that ``work`` leaves alive (what every later collection walks)."""
    gc.collect()
    before = len(gc.get_objects())
    kept = work()
    gc.collect()
    growth = len(gc.get_objects()) - before
    del kept
    return growth


def large_tracked_containers(roots: list[object], limit: int = 100) -> list[str]:
    """Containers of more than ``limit`` items reachable from ``roots`` that the cyclic GC
    tracks (each collection visits every item)."""
    seen: set[int] = set()
    stack = list(roots)
    found = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float)) or callable(obj):
            continue  # callables (a clock, bound methods) lead to module globals
        seen.add(id(obj))
        if isinstance(obj, (dict, set, list, tuple)) and len(obj) > limit and gc.is_tracked(obj):
            found.append(f"{type(obj).__name__} of {len(obj)}")
        stack.extend(gc.get_referents(obj))
    return found
