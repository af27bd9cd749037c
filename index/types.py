"""Domain types of the cache-state index.

Owner: ``inference_cache.index``. These are *domain* types: the gRPC layer
(``inference_cache.extproc``) translates wire messages into them field by field and
back; nothing here imports grpc or the generated stubs.

Vocabulary
- replica id: the engine rank's HTTP ``ip:port`` (what Envoy routes to).
- scope: ``(tenant, model, hash_scheme, adapter)``. Keys only match within one scope.
- block key: opaque bytes. For hash scheme ``vllm`` it is OUR content fingerprint
  (``index.fingerprint``), 8 bytes big-endian; other schemes are exact-match only.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NewType

ReplicaId = NewType("ReplicaId", str)

#: Our content-fingerprint scheme (XXH3-64 seed 1337 over little-endian u32 token ids).
HASH_SCHEME_VLLM = "vllm"


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a block key is meaningful: keys only ever match within one scope."""

    tenant: str
    model: str
    hash_scheme: str
    adapter: str = ""


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """Load/cache statistics a producer reports for one replica (scheme-independent)."""

    cache_memory_bytes: int = 0
    hit_rate: float = 0.0
    pressure: float = 0.0


@dataclass(frozen=True, slots=True)
class PrefixEntry:
    """One reported prefix: legacy form (``prefix_hash``/``token_count``) and/or chain form
    (``block_hashes`` with per-block ``block_token_counts``)."""

    prefix_hash: bytes = b""
    token_count: int = 0
    block_hashes: Sequence[bytes] = ()
    block_token_counts: Sequence[int] = ()
    adapter: str = ""


@dataclass(frozen=True, slots=True)
class Update:
    """An additive delta from a producer (``CacheStateUpdate``): absence is not removal."""

    replica_id: str
    scope: Scope
    prefixes: Sequence[PrefixEntry] = ()
    stats: ReplicaStats | None = None
    #: Seconds since the epoch; ``None`` means "now" (the index clock).
    timestamp: float | None = None


class EventType(enum.IntEnum):
    """Mirrors ``CacheEvent.Type`` numbers."""

    UNSPECIFIED = 0
    PREFIX_ADDED = 1
    PREFIX_EVICTED = 2
    REPLICA_UPDATED = 3
    ALL_CLEARED = 4


@dataclass(frozen=True, slots=True)
class Event:
    """A cache event (``CacheEvent``), applied by ``Index.apply_event`` and fanned out to
    ``StreamCacheEvents`` listeners."""

    type: EventType
    replica_id: str
    model: str = ""
    tenant: str = ""
    prefix_hash: bytes = b""
    adapter: str = ""
    timestamp: float | None = None


class Strategy(enum.Enum):
    """Outcome of a hash-keyed lookup; the server maps it to a reason code."""

    PREFIX_MATCH = "PREFIX_MATCH"
    TENANT_HOT = "TENANT_HOT"
    AFFINITY_HINT = "AFFINITY_HINT"
    NONE = "NO_HINT"
    UNKNOWN_TENANT = "UNKNOWN_TENANT"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    UNKNOWN_HASH_SCHEME = "UNKNOWN_HASH_SCHEME"
    POLICY_REQUIRES_CHAIN = "POLICY_REQUIRES_CHAIN"


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """A hash-keyed lookup (``LookupRouteRequest`` with ``prefix_hash``/``block_hashes``)."""

    scope: Scope
    prefix_hash: bytes = b""
    token_count: int = 0
    block_hashes: Sequence[bytes] = ()
    block_token_counts: Sequence[int] = ()
    ttft_budget_ms: int = 0
    tbt_budget_ms: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaScore:
    replica_id: str
    score: float
    matched_tokens: int
    estimated_cache_hit_prob: float


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """Leading-run match of one replica for a token-keyed lookup."""

    replica_id: str
    #: Number of leading blocks held (>= 1).
    matched_blocks: int
    #: Token count of the last matched block's entry (cumulative tokens).
    matched_tokens: int
    #: Weakest-link freshness in [0, 1] (oldest entry of the run).
    freshness: float


@dataclass(slots=True)
class LookupResult:
    strategy: Strategy
    scores: list[ReplicaScore] = field(default_factory=list)
    #: Entries to credit (LFU) if and only if the answer is delivered; see ``credit_hits``.
    _credit: list[object] = field(default_factory=list, repr=False)

    def credit_hits(self) -> None:
        """Bump the LFU access counters of the entries behind this answer.

        Called by the server only when the response is delivered (never on TIMEOUT).
        Idempotent: a second call credits nothing.
        """
        credit, self._credit = self._credit, []
        for entry in credit:
            entry.access_count += 1  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ReplicaStatsRow:
    """One replica's stats under an exact ``(tenant, model)`` (``GetCacheState``)."""

    replica_id: str
    stats: ReplicaStats


@dataclass(frozen=True, slots=True)
class CacheState:
    """``GetCacheState``: stats sorted by replica id, distinct prefix keys (all schemes)."""

    replicas: tuple[ReplicaStatsRow, ...]
    total_prefixes: int


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Distinct prefix keys per tenant (``""`` = untenanted) and in total."""

    per_tenant: dict[str, int]
    total: int
