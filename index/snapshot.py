"""The ``/snapshot`` domain snapshot and its frozen JSON wire format (seed §4.8).

Owner: ``inference_cache.index``. ``Index.snapshot()`` builds a ``Snapshot``; the HTTP
layer serves ``encode_json(snapshot)`` verbatim. The bytes match what the original Go
server produced with ``encoding/json``: exact key order, float32 fields in Go's shortest
round-trip form, RFC 3339 nano times in UTC, ``null`` for empty lists and ``tenant``
omitted when empty.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
from dataclasses import dataclass

#: Go's zero ``time.Time`` as ``encoding/json`` prints it.
ZERO_TIME = "0001-01-01T00:00:00Z"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_F32_1E_6 = float(struct.unpack("<f", struct.pack("<f", 1e-6))[0])
_F32_1E21 = float(struct.unpack("<f", struct.pack("<f", 1e21))[0])


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    replica_id: str
    tenant: str
    cache_memory_bytes: int
    hit_rate: float
    pressure: float
    #: Stats liveness, nanoseconds since the epoch; ``None`` = Go zero time (prefix-only replica).
    last_update_ns: int | None
    prefix_count: int
    #: Newest entry ``lastSeen`` (ns since the epoch); ``None`` = zero time.
    last_event_at_ns: int | None


@dataclass(frozen=True, slots=True)
class TenantRow:
    tenant_id: str
    memory_used: int
    index_entries: int
    hit_rate: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    replicas: tuple[ReplicaRow, ...]
    tenants: tuple[TenantRow, ...]
    total_prefixes: int
    hot_prefixes: int = 0


def to_float32(x: float) -> float:
    """Round a float to the nearest float32 (what a Go ``float32`` field holds)."""
    if math.isnan(x) or math.isinf(x):
        return 0.0
    try:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])
    except OverflowError:
        return 0.0


def go_float32(x: float) -> str:
    """``encoding/json`` of a float32: shortest decimal that round-trips as float32, plain
    notation unless ``abs < 1e-6`` or ``abs >= 1e21`` (then ``1e-07`` is cleaned to ``1e-7``)."""
    f = to_float32(x)
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    for prec in range(1, 10):
        text = f"{f:.{prec - 1}e}"
        if to_float32(float(text)) == f:
            break
    mantissa, exp_s = text.split("e")
    exp = int(exp_s)
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "").rstrip("0") or "0"
    a = abs(f)
    if a < _F32_1E_6 or a >= _F32_1E21:  # Go compares in float32
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'-' if exp < 0 else '+'}{abs(exp):d}"
    # Plain notation: place the decimal point ``exp + 1`` digits into ``digits``.
    point = exp + 1
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def rfc3339_nano(ns: int | None) -> str:
    """Go's ``time.RFC3339Nano`` for a UTC instant: trailing fractional zeros trimmed."""
    if ns is None:
        return ZERO_TIME
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = (_EPOCH + dt.timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        stamp += "." + f"{frac:09d}".rstrip("0")
    return stamp + "Z"


def _go_string(s: str) -> str:
    """A JSON string as Go escapes it (HTML-safe ``<``, ``>``, ``&``; U+2028/U+2029)."""
    out = json.dumps(s, ensure_ascii=False)
    return (
        out.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _replica(r: ReplicaRow) -> str:
    tenant = f',"tenant":{_go_string(r.tenant)}' if r.tenant else ""
    return (
        f'{{"replicaId":{_go_string(r.replica_id)}{tenant},"cacheMemoryBytes":{r.cache_memory_bytes},'
        f'"hitRate":{go_float32(r.hit_rate)},"pressure":{go_float32(r.pressure)},'
        f'"lastUpdate":"{rfc3339_nano(r.last_update_ns)}","prefixCount":{r.prefix_count},'
        f'"lastEventAt":"{rfc3339_nano(r.last_event_at_ns)}"}}'
    )


def _tenant(t: TenantRow) -> str:
    return (
        f'{{"tenantId":{_go_string(t.tenant_id)},"memoryUsed":{t.memory_used},'
        f'"indexEntries":{t.index_entries},"hitRate":{go_float32(t.hit_rate)}}}'
    )


def encode_json(snap: Snapshot) -> bytes:
    """The ``/snapshot`` body (no trailing newline, as ``json.Marshal``)."""
    replicas = "[" + ",".join(_replica(r) for r in snap.replicas) + "]" if snap.replicas else "null"
    tenants = "[" + ",".join(_tenant(t) for t in snap.tenants) + "]" if snap.tenants else "null"
    return (
        f'{{"replicas":{replicas},"tenants":{tenants},'
        f'"totalPrefixes":{snap.total_prefixes},"hotPrefixes":{snap.hot_prefixes}}}'
    ).encode()
