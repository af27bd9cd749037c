"""Go ``time.Duration`` strings (``100ms``, ``10s``, ``1m30s``, ``-1.5s``, ``0``) in seconds.

Owner: the root package; one parser for every place that reads the original project's
durations (the ``subscribe`` flags, CRD fields such as ``evictionTTL`` and
``firstEventTimeout`` in the operator). No other imports: cheap for every caller.
"""

from __future__ import annotations

import re
from typing import Final

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse(text: str) -> float:
    """Seconds; raises ``ValueError`` for anything Go's ``time.ParseDuration`` refuses
    (a bare number other than ``0``, an unknown unit, trailing text)."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s[1:] if s[:1] in "+-" else s
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        m = _PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (want e.g. 100ms, 10s, 1m30s)")
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"invalid duration {text!r} (want e.g. 100ms, 10s, 1m30s)")
    return sign * total
