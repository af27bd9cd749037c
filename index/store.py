"""The cache-state index: which replica holds which block key, how fresh, how hot.

Owner: ``inference_cache.index``. Everything is soft state. Time comes from the
injected ``clock`` (seconds since the epoch, float); nothing here sleeps or starts
tasks: the server calls ``sweep()`` every ``settings.sweep_interval_s``.

This is the public surface the rest of the project codes against. (Skeleton: the
implementation lands with issue #2's index work.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inference_cache.index import policy as policy_mod
from inference_cache.index import types

Clock = Callable[[], float]
Listener = Callable[[types.Event], None]


@dataclass(frozen=True, slots=True)
class IndexSettings:
    #: Replica x prefix entries before cap eviction (0 = unbounded).
    max_entries: int = 1_000_000
    #: Seconds between TTL sweeps (the server's ticker reads this).
    sweep_interval_s: float = 60.0
    #: Ranker: weight of replica pressure in ``1 - w * pressure``.
    pressure_weight: float = 1.0
    #: Ranker: a request SLO TTFT below this (ms) is "tight" and biases towards freshness.
    slo_tight_ttft_ms: int = 200
    slo_tight_bias: float = 1.0
    #: TENANT_HOT: minimum replica hit rate and maximum stats age (seconds).
    tenant_hot_min_hit_rate: float = 0.1
    tenant_hot_max_age_s: float = 300.0


class Index:
    def __init__(
        self,
        settings: IndexSettings | None = None,
        *,
        policies: policy_mod.PolicyStore | None = None,
        clock: Clock = time.time,
    ) -> None:
        raise NotImplementedError

    # -- producers ------------------------------------------------------------------
    def ingest(self, update: types.Update) -> None:
        """``ReportCacheState``: additive upsert of prefixes (legacy and chain forms) and stats."""
        raise NotImplementedError

    def apply_event(self, event: types.Event) -> None:
        """``PublishEvent``: PREFIX_EVICTED / ALL_CLEARED / REPLICA_UPDATED (PREFIX_ADDED: no-op)."""
        raise NotImplementedError

    # The KV-event sink (``kvevents.mapper.BlockSink``): our fingerprints, straight from ingest.
    def blocks_stored(
        self,
        scope: types.Scope,
        replica_id: str,
        keys: Sequence[bytes],
        token_counts: Sequence[int],
        ts: float | None = None,
    ) -> None:
        raise NotImplementedError

    def blocks_removed(self, scope: types.Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        raise NotImplementedError

    def replica_cleared(self, replica_id: str, *, model: str, tenant: str) -> None:
        raise NotImplementedError

    def set_stats(
        self, *, tenant: str, model: str, replica_id: str, stats: types.ReplicaStats, ts: float | None = None
    ) -> None:
        raise NotImplementedError

    # -- lookups ----------------------------------------------------------------------
    def lookup(self, req: types.LookupRequest) -> types.LookupResult:
        """Hash-keyed lookup with the original's semantics (exact / chain / TENANT_HOT,
        ranking, miss classification). Policy floors and AFFINITY_HINT are applied by
        ``lookup_policy`` (see there)."""
        raise NotImplementedError

    def longest_prefix(self, scope: types.Scope, keys: Sequence[bytes]) -> list[types.PrefixMatch]:
        """Token-keyed path: every replica whose leading run over ``keys`` is >= 1 fresh
        block, longest first (ties by replica id)."""
        raise NotImplementedError

    # -- reads -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        raise NotImplementedError

    def sweep(self) -> None:
        raise NotImplementedError

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Register a callback for index events; returns an unsubscribe function."""
        raise NotImplementedError
