"""Per-namespace cache policy and per-tenant quotas, as pushed by the operator.

Owner: ``inference_cache.index`` (domain). The ``/policy`` wire format (versions 3-7)
is decoded at the server boundary (``inference_cache.extproc.policy_wire``) into these
types; ``PolicyStore.replace`` swaps the whole snapshot at once (replace-on-write).

A policy in namespace ``X`` applies to lookups/ingests with tenant ``X``. Tenants
without a policy get ``DEFAULT_POLICY`` (the original's later server defaults).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: Index default TTL when a namespace sets none (30 minutes, as the original).
DEFAULT_TTL_S = 30 * 60.0


@dataclass(frozen=True, slots=True)
class StrategyGates:
    """``CachePolicy.spec.strategy``: gates on the hash-keyed lookup path."""

    enable_chain_matching: bool = True
    require_chain: bool = False
    enable_tenant_hot: bool = True


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    namespace: str = ""
    #: Entry TTL in seconds; ``0`` means the index default (``DEFAULT_TTL_S``).
    eviction_ttl_s: float = 0.0
    #: Request-side floor: prompts shorter than this get no prefix hint (0 = off).
    minimum_prefix_tokens: int = 0
    #: Result-side per-replica floor on matched tokens (0 = off; default 64).
    minimum_matched_tokens: int = 64
    #: Whole-response floor on the top score (0 = off; default 0.1).
    routing_floor_score: float = 0.1
    #: Lookup deadline in milliseconds (0 = none).
    lookup_timeout_ms: int = 0
    #: Consistent-hash AFFINITY_HINT fallback for otherwise hint-less answers.
    affinity_routing: bool = True
    #: ``"lru"`` or ``"lfu"`` (lower case).
    eviction: str = "lru"
    strategy: StrategyGates = field(default_factory=StrategyGates)

    @property
    def ttl_s(self) -> float:
        return self.eviction_ttl_s if self.eviction_ttl_s > 0 else DEFAULT_TTL_S


@dataclass(frozen=True, slots=True)
class TenantQuota:
    tenant_id: str
    #: Distinct prefix keys the tenant may hold; 0 admits nothing.
    max_index_entries: int
    isolation_mode: str = "Fairness"


DEFAULT_POLICY = NamespacePolicy()


class PolicyStore:
    """Thread-safe holder of the current policy snapshot.

    Reads are lock-free (one attribute load of an immutable mapping); ``replace`` swaps
    both maps atomically under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: Mapping[str, NamespacePolicy] = {}
        self._quotas: Mapping[str, TenantQuota] = {}
        #: Incremented on every replace; lets caches of resolved values notice changes.
        self.generation = 0

    def replace(self, policies: Iterable[NamespacePolicy], tenants: Iterable[TenantQuota] = ()) -> None:
        """Replace the whole snapshot. Entries with an empty namespace / tenant id are
        dropped; negative quotas clamp to 0; a later entry for the same namespace / tenant
        id replaces an earlier one (the original's ``ReplaceSnapshot``: a map assignment
        per entry)."""
        pol: dict[str, NamespacePolicy] = {}
        for p in policies:
            if p.namespace:
                pol[p.namespace] = p
        quo: dict[str, TenantQuota] = {}
        for t in tenants:
            if t.tenant_id:
                quo[t.tenant_id] = (
                    t if t.max_index_entries >= 0 else TenantQuota(t.tenant_id, 0, t.isolation_mode)
                )
        with self._lock:
            self._policies = pol
            self._quotas = quo
            self.generation += 1

    def policy(self, namespace: str) -> NamespacePolicy:
        return self._policies.get(namespace, DEFAULT_POLICY)

    def ttl_s(self, namespace: str) -> float:
        return self.policy(namespace).ttl_s

    def is_lfu(self, namespace: str) -> bool:
        return self.policy(namespace).eviction.lower() == "lfu"

    def quota(self, tenant_id: str) -> int | None:
        """Max distinct prefix keys for the tenant, or ``None`` when unbounded."""
        q = self._quotas.get(tenant_id)
        return None if q is None else q.max_index_entries

    def policies(self) -> list[NamespacePolicy]:
        return sorted(self._policies.values(), key=lambda p: p.namespace)

    def quotas(self) -> list[TenantQuota]:
        return sorted(self._quotas.values(), key=lambda q: q.tenant_id)
