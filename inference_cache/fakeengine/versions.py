"""vLLM version parsing for the fake engine.

Owner: ``inference_cache.fakeengine``. Every version-dependent rule (event schema, hash
seeding, extra keys, replay framing) compares against a :data:`Version` tuple built here.
"""

from __future__ import annotations

Version = tuple[int, int, int]

#: The oldest and newest vLLM releases whose wire format was read from source.
OLDEST: Version = (0, 9, 0)
NEWEST: Version = (0, 33, 0)


def parse(text: str) -> Version:
    """``"0.33"`` / ``"0.10.2"`` -> ``(0, 33, 0)`` / ``(0, 10, 2)``; outside the read range
    is an error (the schema of an unread release is a guess)."""
    parts = text.strip().lstrip("v").split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a vLLM version: {text!r}")
    major, minor, patch = (int(p) for p in [*parts, "0"][:3])
    version = (major, minor, patch)
    if not OLDEST <= version <= NEWEST:
        raise ValueError(f"vLLM {text} is outside the emulated range 0.9.0 .. 0.33.0")
    return version
