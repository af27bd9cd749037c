"""The cache-state index: which replica holds which block key, how fresh, how hot.

Owner: ``inference_cache.index``. Producers (``ReportCacheState``, ``PublishEvent``, the
KV-event sink) write here; ``LookupRoute`` and the ext_proc scorer read; the server exports
the counters as metrics and serves ``snapshot()`` on ``/snapshot``. Everything is soft
state. Time comes from the injected ``clock`` (seconds since the epoch, float); nothing
here sleeps or starts tasks: the server calls ``sweep()`` every ``settings.sweep_interval_s``.

Data layout (memory is the constraint: ~1M+ entries)
- one ``_Scope`` per ``(tenant, model, hash_scheme, adapter)``, holding one ``_Replica``
  per replica with at least one entry;
- a ``_Replica`` owns ``entries: dict[key, packed int]`` in refresh order (a refresh pops
  and re-inserts), so the dict's head is its least recently seen entry (LRU for free);
- an entry is one int: ``last_seen_us << 64 | hits << 32 | token_count``, so comparing
  entries compares their ``lastSeen`` first (the chain walk takes a C-level ``min``).
There is no per-key holder map: a key's holders are found by probing the (few) replicas of
its scope, which is also what the chain walk does block by block.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from inference_cache.index import policy as policy_mod
from inference_cache.index import ranking, snapshot, types

Clock = Callable[[], float]
Listener = Callable[[types.Event], None]
#: ``(scope, replica_id, keys)``: entries the index evicted (cap, quota or TTL), batched.
EvictionListener = Callable[[types.Scope, str, Sequence[bytes]], None]

#: Reserved tenant of the functional self-test: always NO_HINT.
PROBE_TENANT = "inferencecache.io/probe"

_TOK_MASK = (1 << 32) - 1
_TS_MASK = (1 << 64) - 1
_TS_SHIFT = 64
_HIT_SHIFT = 32
_HIT_MAX = (1 << 32) - 1
_HIT_MASK = _HIT_MAX << _HIT_SHIFT
_LOW_MASK = (1 << _TS_SHIFT) - 1
#: Blocks fetched at once by the chain walk's single-runner fast path.
_WALK_CHUNK = 32


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


class _Scope:
    __slots__ = ("distinct", "key", "replicas")

    def __init__(self, key: types.Scope) -> None:
        self.key = key
        self.replicas: dict[str, _Replica] = {}
        #: Distinct block keys held by any replica of this scope.
        self.distinct = 0


class _Replica:
    __slots__ = ("entries", "last_ts", "ordered", "replica_id", "scope")

    def __init__(self, scope: _Scope, replica_id: str) -> None:
        self.scope = scope
        self.replica_id = replica_id
        self.entries: dict[bytes, int] = {}
        self.last_ts = 0
        #: False once an entry was written with an older timestamp than the newest one.
        self.ordered = True


class _Stat:
    __slots__ = ("last_seen_us", "reported_us", "stats")

    def __init__(self, stats: types.ReplicaStats, ts_us: int) -> None:
        self.stats = stats
        self.last_seen_us = ts_us
        self.reported_us = ts_us


class _Credit:
    """One entry to credit: ``credit_hits`` does ``c.access_count += 1`` on it."""

    __slots__ = ("key", "lock", "replica")

    def __init__(self, replica: _Replica, key: bytes, lock: threading.Lock) -> None:
        self.replica = replica
        self.key = key
        self.lock = lock

    @property
    def access_count(self) -> int:
        v = self.replica.entries.get(self.key)
        return 0 if v is None else (v & _HIT_MASK) >> _HIT_SHIFT

    @access_count.setter
    def access_count(self, n: int) -> None:
        with self.lock:
            v = self.replica.entries.get(self.key)
            if v is not None:  # assignment to a present key keeps its LRU position
                self.replica.entries[self.key] = (v & ~_HIT_MASK) | (min(max(n, 0), _HIT_MAX) << _HIT_SHIFT)


def _to_us(ts: float) -> int:
    return max(0, min(round(ts * 1_000_000), _TS_MASK))


def _sanitize(x: float) -> float:
    return 0.0 if math.isnan(x) or math.isinf(x) else x


class _Walk:
    """A replica's leading run over a chain."""

    __slots__ = ("blocks", "last_tokens", "oldest_us", "replica")

    def __init__(self, replica: _Replica, oldest_us: int, last_tokens: int) -> None:
        self.replica = replica
        self.blocks = 1
        self.oldest_us = oldest_us
        self.last_tokens = last_tokens


class Index:
    """The in-memory index. Thread-safe: one lock guards every mutation and lookup."""

    def __init__(
        self,
        settings: IndexSettings | None = None,
        *,
        policies: policy_mod.PolicyStore | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings or IndexSettings()
        self.policies = policies or policy_mod.PolicyStore()
        self._clock = clock
        self._lock = threading.Lock()
        self._scopes: dict[types.Scope, _Scope] = {}
        self._by_tm: dict[tuple[str, str], list[_Scope]] = {}
        self._tenant_keys: Counter[str] = Counter()
        self._stats: dict[tuple[str, str, str], _Stat] = {}
        self._stats_by_tm: dict[tuple[str, str], set[str]] = {}
        self._listeners: list[Listener] = []
        #: ``(replica_id, model, tenant)`` callbacks on ALL_CLEARED (cheap: no event objects
        #: per ingested block, unlike ``add_listener``).
        self._clear_listeners: list[Callable[[str, str, str], None]] = []
        self._eviction_listeners: list[EvictionListener] = []
        #: Evictions not yet told to the eviction listeners (lock held to add or take).
        self._evicted: dict[tuple[types.Scope, str], list[bytes]] = {}
        self._ready = False
        #: Models that ever held entries (their gauge drops to 0 when drained).
        self._reported_models: set[str] = set()
        #: Replica x prefix entries (the cap unit).
        self.total_entries = 0
        #: ``inferencecache_index_evictions_total``: (algorithm, reason in {cap, ttl}) -> entries.
        self.index_evictions: Counter[tuple[str, str]] = Counter()
        #: ``inferencecache_tenant_evictions_total{reason="over_entries"}``: tenant -> keys.
        self.tenant_evictions: Counter[str] = Counter()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._ready = True

    def stop(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Register a callback for index events; returns an unsubscribe function.

        Callbacks run synchronously after the index lock is released, in the writer's
        thread; they must not block."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def add_clear_listener(self, listener: Callable[[str, str, str], None]) -> None:
        """Call ``listener(replica_id, model, tenant)`` after a replica's state is cleared
        (an engine restart or resync, ``ALL_CLEARED``), in the writer's thread."""
        self._clear_listeners.append(listener)

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(scope, replica_id, keys)`` for entries the index itself evicted
        (entry cap, tenant quota, TTL sweep) or a ``PREFIX_EVICTED`` event removed (engine
        ``BlockRemoved`` events reach their own sinks), batched per write or sweep, after the lock is
        released, in the writer's thread (auxiliary indexes drop what the index dropped)."""
        self._eviction_listeners.append(listener)

    def _note_evicted_locked(self, rs: _Replica, key: bytes) -> None:
        if self._eviction_listeners:
            self._evicted.setdefault((rs.scope.key, rs.replica_id), []).append(key)

    def _fire_evictions(self) -> None:
        if not self._evicted:
            return
        with self._lock:
            batch, self._evicted = self._evicted, {}
        for (scope, replica_id), keys in batch.items():
            for cb in list(self._eviction_listeners):
                cb(scope, replica_id, keys)

    def _emit(self, events: list[types.Event]) -> None:
        for ev in events:
            for cb in list(self._listeners):
                cb(ev)

    # -- producers ------------------------------------------------------------------
    def ingest(self, update: types.Update) -> None:
        """``ReportCacheState``: additive upsert of prefixes (legacy and chain forms) and stats.

        Chain form: ``block_hashes[j]`` is stored with the cumulative token count
        ``sum(block_token_counts[:j+1])``; mismatched lengths drop the entry; a co-set
        ``prefix_hash`` is stored too. Empty hash scheme: prefixes dropped, stats kept."""
        now = self._clock() if update.timestamp is None else update.timestamp
        ts_us = _to_us(now)
        events: list[types.Event] | None = [] if self._listeners else None
        sc = update.scope
        with self._lock:
            if sc.hash_scheme:
                for p in update.prefixes:
                    scope = (
                        sc
                        if p.adapter == sc.adapter or not p.adapter
                        else types.Scope(sc.tenant, sc.model, sc.hash_scheme, p.adapter)
                    )
                    if p.block_hashes or p.block_token_counts:
                        if len(p.block_hashes) != len(p.block_token_counts):
                            continue
                        cumulative: list[int] = []
                        total = 0
                        for c in p.block_token_counts:
                            total += c
                            cumulative.append(total)
                        self._upsert(scope, update.replica_id, p.block_hashes, cumulative, ts_us, events)
                        if p.prefix_hash:
                            self._upsert(
                                scope, update.replica_id, (p.prefix_hash,), (p.token_count,), ts_us, events
                            )
                    else:
                        self._upsert(
                            scope, update.replica_id, (p.prefix_hash,), (p.token_count,), ts_us, events
                        )
            if update.stats is not None:
                self._set_stats_locked(sc.tenant, sc.model, update.replica_id, update.stats, ts_us, events)
            self._enforce_locked(sc.tenant, events)
        self._fire_evictions()
        if events:
            self._emit(events)

    def blocks_stored(
        self,
        scope: types.Scope,
        replica_id: str,
        keys: Sequence[bytes],
        token_counts: Sequence[int],
        ts: float | None = None,
    ) -> None:
        """KV-event sink: ``keys[i]`` is stored with ``token_counts[i]`` (cumulative tokens
        up to and including that block). Mismatched lengths or an empty scheme: ignored."""
        if not scope.hash_scheme or len(keys) != len(token_counts):
            return
        ts_us = _to_us(self._clock() if ts is None else ts)
        events: list[types.Event] | None = [] if self._listeners else None
        with self._lock:
            self._upsert(scope, replica_id, keys, token_counts, ts_us, events)
            self._enforce_locked(scope.tenant, events)
        self._fire_evictions()
        if events:
            self._emit(events)

    def blocks_removed(self, scope: types.Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        """KV-event sink: the replica dropped these keys (exact scope)."""
        events: list[types.Event] | None = [] if self._listeners else None
        with self._lock:
            sc = self._scopes.get(scope)
            rs = sc.replicas.get(replica_id) if sc else None
            if rs is not None:
                for k in keys:
                    if k in rs.entries:
                        self._remove_locked(rs, k, events)
                self._prune_locked(rs)
        if events:
            self._emit(events)

    def replica_cleared(self, replica_id: str, *, model: str, tenant: str) -> None:
        """``ALL_CLEARED``: drop every entry of the replica under ``(tenant, model)`` in every
        scope (scheme, adapter), and its stats."""
        self.apply_event(types.Event(types.EventType.ALL_CLEARED, replica_id, model=model, tenant=tenant))

    def set_stats(
        self, *, tenant: str, model: str, replica_id: str, stats: types.ReplicaStats, ts: float | None = None
    ) -> None:
        ts_us = _to_us(self._clock() if ts is None else ts)
        events: list[types.Event] | None = [] if self._listeners else None
        with self._lock:
            self._set_stats_locked(tenant, model, replica_id, stats, ts_us, events)
        if events:
            self._emit(events)

    def apply_event(self, event: types.Event) -> None:
        """``PublishEvent``.

        - ``PREFIX_EVICTED``: the replica loses ``prefix_hash`` in every hash scheme of
          ``(tenant, model, adapter)`` (removal is conservative: events carry no scheme).
        - ``ALL_CLEARED``: the replica loses everything under ``(tenant, model)`` and its stats.
        - ``REPLICA_UPDATED``: stats liveness only (never the stats payload time).
        - ``PREFIX_ADDED`` / unknown: no-op (adds come only with a scheme and token count).
        """
        ts_us = _to_us(self._clock() if event.timestamp is None else event.timestamp)
        events: list[types.Event] | None = [] if self._listeners else None
        t, m, r = event.tenant, event.model, event.replica_id
        with self._lock:
            if event.type == types.EventType.REPLICA_UPDATED:
                st = self._stats.get((t, m, r))
                if st is not None:
                    st.last_seen_us = ts_us
                    if events is not None:
                        events.append(event)
            elif event.type == types.EventType.PREFIX_EVICTED:
                for sc in list(self._by_tm.get((t, m), ())):
                    rs = sc.replicas.get(r)
                    if sc.key.adapter == event.adapter and rs is not None and event.prefix_hash in rs.entries:
                        self._remove_locked(rs, event.prefix_hash, events)
                        self._note_evicted_locked(rs, event.prefix_hash)
                        self._prune_locked(rs)
            elif event.type == types.EventType.ALL_CLEARED:
                for sc in list(self._by_tm.get((t, m), ())):
                    rs = sc.replicas.get(r)
                    if rs is not None:
                        for k in list(rs.entries):
                            self._remove_locked(rs, k, None)
                        self._prune_locked(rs)
                if self._stats.pop((t, m, r), None) is not None:
                    self._drop_stat_index(t, m, r)
                if events is not None:
                    events.append(types.Event(types.EventType.ALL_CLEARED, r, m, t, timestamp=ts_us / 1e6))
        self._fire_evictions()
        if event.type == types.EventType.ALL_CLEARED:
            for cleared in list(self._clear_listeners):
                cleared(r, m, t)
        if events:
            self._emit(events)

    # -- write internals (lock held) --------------------------------------------------------
    def _upsert(
        self,
        scope: types.Scope,
        replica_id: str,
        keys: Sequence[bytes],
        tokens: Sequence[int],
        ts_us: int,
        events: list[types.Event] | None,
    ) -> None:
        sc = self._scopes.get(scope)
        if sc is None:
            sc = self._scopes[scope] = _Scope(scope)
            self._by_tm.setdefault((scope.tenant, scope.model), []).append(sc)
            self._reported_models.add(scope.model)
        rs = sc.replicas.get(replica_id)
        if rs is None:
            rs = sc.replicas[replica_id] = _Replica(sc, replica_id)
        if ts_us < rs.last_ts:
            rs.ordered = False
        else:
            rs.last_ts = ts_us
        others = [o.entries for o in sc.replicas.values() if o is not rs]
        entries = rs.entries
        pop = entries.pop
        base = ts_us << _TS_SHIFT
        mask = _TOK_MASK
        hit_mask = _HIT_MASK
        added = new_keys = 0
        for key, tok in zip(keys, tokens, strict=True):
            old = pop(key, None)
            if old is not None:
                entries[key] = (old & hit_mask) | base | (tok & mask if tok > 0 else 0)
                continue
            entries[key] = base | (tok & mask if tok > 0 else 0)
            added += 1
            for d in others:
                if key in d:
                    break
            else:
                new_keys += 1
            if events is not None:
                events.append(
                    types.Event(
                        types.EventType.PREFIX_ADDED,
                        replica_id,
                        scope.model,
                        scope.tenant,
                        key,
                        scope.adapter,
                        ts_us / 1e6,
                    )
                )
        self.total_entries += added
        sc.distinct += new_keys
        if new_keys:
            self._tenant_keys[scope.tenant] += new_keys
        if not entries:
            self._prune_locked(rs)

    def _remove_locked(self, rs: _Replica, key: bytes, events: list[types.Event] | None) -> None:
        """Remove one (key, replica) entry; the caller prunes ``rs`` when done."""
        del rs.entries[key]
        self.total_entries -= 1
        sc = rs.scope
        if not any(key in o.entries for o in sc.replicas.values() if o is not rs):
            sc.distinct -= 1
            t = sc.key.tenant
            self._tenant_keys[t] -= 1
            if self._tenant_keys[t] <= 0:
                del self._tenant_keys[t]
        if events is not None:
            s = sc.key
            events.append(
                types.Event(
                    types.EventType.PREFIX_EVICTED,
                    rs.replica_id,
                    s.model,
                    s.tenant,
                    key,
                    s.adapter,
                    self._clock(),
                )
            )

    def _prune_locked(self, rs: _Replica) -> None:
        if rs.entries:
            return
        sc = rs.scope
        if sc.replicas.get(rs.replica_id) is rs:
            del sc.replicas[rs.replica_id]
        if not sc.replicas and self._scopes.get(sc.key) is sc:
            del self._scopes[sc.key]
            tm = (sc.key.tenant, sc.key.model)
            lst = self._by_tm[tm]
            lst.remove(sc)
            if not lst:
                del self._by_tm[tm]

    def _set_stats_locked(
        self,
        tenant: str,
        model: str,
        replica_id: str,
        stats: types.ReplicaStats,
        ts_us: int,
        events: list[types.Event] | None,
    ) -> None:
        clean = types.ReplicaStats(
            stats.cache_memory_bytes, _sanitize(stats.hit_rate), _sanitize(stats.pressure)
        )
        self._stats[(tenant, model, replica_id)] = _Stat(clean, ts_us)
        self._stats_by_tm.setdefault((tenant, model), set()).add(replica_id)
        if events is not None:
            events.append(
                types.Event(types.EventType.REPLICA_UPDATED, replica_id, model, tenant, timestamp=ts_us / 1e6)
            )

    def _drop_stat_index(self, tenant: str, model: str, replica_id: str) -> None:
        ids = self._stats_by_tm.get((tenant, model))
        if ids is not None:
            ids.discard(replica_id)
            if not ids:
                del self._stats_by_tm[(tenant, model)]

    def _enforce_locked(self, tenant: str, events: list[types.Event] | None) -> None:
        quota = self.policies.quota(tenant)
        if quota is not None and self._tenant_keys.get(tenant, 0) > quota:
            self._evict_quota_locked(tenant, self._tenant_keys[tenant] - quota, events)
        cap = self.settings.max_entries
        if cap > 0 and self.total_entries > cap:
            self._evict_cap_locked(self.total_entries - cap, events)

    def _evict_quota_locked(self, tenant: str, excess: int, events: list[types.Event] | None) -> None:
        """Remove the tenant's ``excess`` oldest distinct keys, whole (every replica).

        A key's age is its freshest replica's ``lastSeen``; ties by key bytes. The tenant's
        per-replica dicts are merged in time order and a key completes when its last holder
        is passed, so keys complete oldest-first and the walk stops early."""
        self._reorder_locked()

        def stream(sc: _Scope, rs: _Replica) -> Iterator[tuple[int, bytes, _Scope]]:
            for k, v in rs.entries.items():
                yield v >> _TS_SHIFT, k, sc

        streams = [
            stream(sc, rs)
            for sc in self._scopes.values()
            if sc.key.tenant == tenant
            for rs in sc.replicas.values()
        ]
        pending: dict[tuple[types.Scope, bytes], int] = {}
        done: list[tuple[int, bytes, _Scope]] = []
        last_ts: int | None = None
        for ts, k, sc in heapq.merge(*streams, key=lambda item: item[0]):
            if last_ts is not None and ts > last_ts:
                break
            key = (sc.key, k)
            left = pending.pop(key, None)
            if left is None:
                left = sum(1 for o in sc.replicas.values() if k in o.entries)
            if left > 1:
                pending[key] = left - 1
                continue
            done.append((ts, k, sc))
            if len(done) >= excess:
                last_ts = ts
        done.sort(key=lambda d: (d[0], d[1], d[2].key.model, d[2].key.hash_scheme, d[2].key.adapter))
        victims = done[:excess]
        for _ts, k, sc in victims:
            for rs in list(sc.replicas.values()):
                if k in rs.entries:
                    self._remove_locked(rs, k, events)
                    self._note_evicted_locked(rs, k)
                    self._prune_locked(rs)
        self.tenant_evictions[tenant] += len(victims)

    def _algorithms(self) -> dict[str, str]:
        algos: dict[str, str] = {}
        for sc in self._scopes.values():
            t = sc.key.tenant
            if t not in algos:
                algos[t] = "lfu" if self.policies.is_lfu(t) else "lru"
        return algos

    def _reorder_locked(self) -> None:
        for sc in self._scopes.values():
            for rs in sc.replicas.values():
                if not rs.ordered:
                    items = sorted(rs.entries.items(), key=lambda kv: kv[1] >> _TS_SHIFT)
                    rs.entries = dict(items)
                    rs.ordered = True
                    rs.last_ts = items[-1][1] >> _TS_SHIFT if items else 0

    def _evict_cap_locked(self, need: int, events: list[types.Event] | None) -> None:
        """Evict ``need`` entries in the original's order: ``(effective count, lastSeen,
        tenant, model, scheme, adapter, key, replica)`` with effective count = hits for LFU
        tenants, else 0. Without LFU tenants this is a merge of the per-replica LRU heads
        (no full sort); with one, a bounded selection over all entries."""
        algos = self._algorithms()
        victims: list[tuple[_Replica, bytes]] = []
        if "lfu" in algos.values():

            def candidates() -> Iterator[tuple[int, int, str, str, str, str, bytes, str, _Replica]]:
                for sc in self._scopes.values():
                    s = sc.key
                    lfu = algos[s.tenant] == "lfu"
                    for rs in sc.replicas.values():
                        for k, v in rs.entries.items():
                            eff = (v & _HIT_MASK) >> _HIT_SHIFT if lfu else 0
                            ts = v >> _TS_SHIFT
                            yield (eff, ts, s.tenant, s.model, s.hash_scheme, s.adapter, k, rs.replica_id, rs)

            for c in heapq.nsmallest(need, candidates(), key=lambda c: c[:8]):
                victims.append((c[8], c[6]))
        else:
            self._reorder_locked()
            victims = self._lru_victims(need)
        for rs, k in victims:
            algo = algos[rs.scope.key.tenant]
            self._remove_locked(rs, k, events)
            self._note_evicted_locked(rs, k)
            self._prune_locked(rs)
            self.index_evictions[(algo, "cap")] += 1

    def _lru_victims(self, need: int) -> list[tuple[_Replica, bytes]]:
        """Oldest-first over ordered per-replica dicts; equal timestamps by the tie-break."""
        replicas = [rs for sc in self._scopes.values() for rs in sc.replicas.values()]
        cursors = {id(rs): iter(rs.entries.items()) for rs in replicas}
        heads: dict[int, tuple[bytes, int] | None] = {id(rs): next(cursors[id(rs)], None) for rs in replicas}
        victims: list[tuple[_Replica, bytes]] = []
        while len(victims) < need:
            live = [(rs, heads[id(rs)]) for rs in replicas if heads[id(rs)] is not None]
            if not live:
                break
            min_ts = min(h[1] >> _TS_SHIFT for _rs, h in live if h is not None)
            run: list[tuple[tuple[str, str, str, str, bytes, str], _Replica, bytes]] = []
            for rs, h in live:
                while h is not None and h[1] >> _TS_SHIFT == min_ts:
                    s = rs.scope.key
                    run.append(((s.tenant, s.model, s.hash_scheme, s.adapter, h[0], rs.replica_id), rs, h[0]))
                    h = next(cursors[id(rs)], None)
                heads[id(rs)] = h
            run.sort(key=lambda r: r[0])
            victims.extend((rs, k) for _o, rs, k in run[: need - len(victims)])
        return victims

    # -- maintenance --------------------------------------------------------------------------
    def sweep(self) -> None:
        """TTL sweep: drop entries and stats whose age reached the tenant's TTL."""
        now_us = _to_us(self._clock())
        events: list[types.Event] | None = [] if self._listeners else None
        ttl_cache: dict[str, int] = {}

        def cutoff(tenant: str) -> int:
            if tenant not in ttl_cache:
                ttl_cache[tenant] = now_us - _to_us(self.policies.ttl_s(tenant))
            return ttl_cache[tenant]

        with self._lock:
            for sc in list(self._scopes.values()):
                t = sc.key.tenant
                cut = cutoff(t)
                algo = "lfu" if self.policies.is_lfu(t) else "lru"
                for rs in list(sc.replicas.values()):
                    if rs.ordered:
                        stale = []
                        for k, v in rs.entries.items():
                            if v >> _TS_SHIFT > cut:
                                break
                            stale.append(k)
                    else:
                        stale = [k for k, v in rs.entries.items() if v >> _TS_SHIFT <= cut]
                    for k in stale:
                        self._remove_locked(rs, k, events)
                        self._note_evicted_locked(rs, k)
                    self._prune_locked(rs)
                    if stale:
                        self.index_evictions[(algo, "ttl")] += len(stale)
            for (t, m, r), st in list(self._stats.items()):
                if st.last_seen_us <= cutoff(t):
                    del self._stats[(t, m, r)]
                    self._drop_stat_index(t, m, r)
        self._fire_evictions()
        if events:
            self._emit(events)

    # -- lookups ------------------------------------------------------------------------------
    def _pressure_factor(self, tenant: str, model: str, replica_id: str, now_us: int, ttl_s: float) -> float:
        st = self._stats.get((tenant, model, replica_id))
        p = 0.0
        if st is not None and ranking.freshness((now_us - st.reported_us) / 1e6, ttl_s) > 0:
            p = st.stats.pressure
        return ranking.pressure_factor(p, self.settings.pressure_weight)

    def _walk(self, sc: _Scope, keys: Sequence[bytes], cut_us: int) -> list[_Walk]:
        """Longest leading run per replica: seeded at block 0 only, dropping out is final,
        stale entries (``lastSeen <= cut_us``) break a run."""
        k0 = keys[0]
        running: list[_Walk] = []
        for rs in sc.replicas.values():
            v = rs.entries.get(k0)
            if v is not None:
                ts = v >> _TS_SHIFT
                if ts > cut_us:
                    running.append(_Walk(rs, ts, v & _TOK_MASK))
        done: list[_Walk] = []
        n = len(keys)
        i = 1
        while running and i < n:
            if len(running) == 1:
                # The common case: one runner left, walk it to its end without bookkeeping.
                w = running[0]
                blocks, oldest, lastv = w.blocks, w.oldest_us, -1
                # Entries compare by lastSeen first; a missing block reads as -1. So one C-level
                # ``min`` per chunk tells whether the whole chunk is present and fresh.
                stale_v = max((cut_us << _TS_SHIFT) | _LOW_MASK, -1)
                get = w.replica.entries.get
                values = map(get, itertools.islice(keys, i, None), itertools.repeat(-1))
                while chunk := list(itertools.islice(values, _WALK_CHUNK)):
                    low = min(chunk)
                    whole = low > stale_v
                    if not whole:
                        chunk = chunk[: next(j for j, v in enumerate(chunk) if v <= stale_v)]
                        if not chunk:
                            break
                        low = min(chunk)
                    oldest = min(oldest, low >> _TS_SHIFT)
                    blocks += len(chunk)
                    lastv = chunk[-1]
                    if not whole:
                        break
                w.blocks, w.oldest_us = blocks, oldest
                if lastv >= 0:
                    w.last_tokens = lastv & _TOK_MASK
                break
            k = keys[i]
            still: list[_Walk] = []
            for w in running:
                v = w.replica.entries.get(k)
                if v is None:
                    done.append(w)
                    continue
                ts = v >> _TS_SHIFT
                if ts <= cut_us:
                    done.append(w)
                    continue
                w.blocks += 1
                w.last_tokens = v & _TOK_MASK
                if ts < w.oldest_us:
                    w.oldest_us = ts
                still.append(w)
            running = still
            i += 1
        done.extend(running)
        return done

    def longest_prefix(self, scope: types.Scope, keys: Sequence[bytes]) -> list[types.PrefixMatch]:
        """Token-keyed path: every replica whose leading run over ``keys`` is >= 1 fresh
        block, longest first (ties by replica id). ``matched_tokens`` is the token count
        stored with the last matched entry; freshness is the run's weakest link."""
        now_us = _to_us(self._clock())
        ttl = self.policies.ttl_s(scope.tenant)
        with self._lock:
            sc = self._scopes.get(scope)
            walks = self._walk(sc, keys, now_us - _to_us(ttl)) if sc is not None and keys else []
        out = [
            types.PrefixMatch(
                w.replica.replica_id,
                w.blocks,
                w.last_tokens,
                ranking.freshness((now_us - w.oldest_us) / 1e6, ttl),
            )
            for w in walks
        ]
        out.sort(key=lambda p: (-p.matched_blocks, p.replica_id))
        return out

    def lookup(self, req: types.LookupRequest) -> types.LookupResult:
        """Index-side hash-keyed lookup (the original ``LookupRoute`` with HEAD's dp factor
        and miss classification): exact / chain / TENANT_HOT, ranking, LFU credit capture.
        No policy floors, strategy gates or affinity: see ``lookup_route``."""
        result, _ = self._lookup(req)
        return result

    def _lookup(self, req: types.LookupRequest) -> tuple[types.LookupResult, dict[str, list[_Credit]]]:
        s = req.scope
        none = types.LookupResult(types.Strategy.NONE)
        if not s.hash_scheme:
            return none, {}
        chain = bool(req.block_hashes) or bool(req.block_token_counts)
        if chain and len(req.block_hashes) != len(req.block_token_counts):
            return none, {}
        now_us = _to_us(self._clock())
        ttl = self.policies.ttl_s(s.tenant)
        lfu = self.policies.is_lfu(s.tenant)
        cut = now_us - _to_us(ttl)
        coef = ranking.slo_coef(
            req.ttft_budget_ms, self.settings.slo_tight_ttft_ms, self.settings.slo_tight_bias
        )
        credits: dict[str, list[_Credit]] = {}
        scores: list[types.ReplicaScore] = []
        with self._lock:
            sc = self._scopes.get(s)
            if sc is not None:
                total = len(sc.replicas)
                if chain:
                    walks = self._walk(sc, req.block_hashes, cut)
                    counts = req.block_token_counts
                    runs = [(w, sum(counts[: w.blocks])) for w in walks]
                    scored = [(w, m) for w, m in runs if m > 0]
                    dps = ranking.chain_dp_factors([m for _w, m in scored], total)
                    for (w, matched), dp in zip(scored, dps, strict=True):
                        fr = ranking.freshness((now_us - w.oldest_us) / 1e6, ttl)
                        if fr <= 0:
                            continue
                        rid = w.replica.replica_id
                        pf = self._pressure_factor(s.tenant, s.model, rid, now_us, ttl)
                        score = matched * fr * pf * (1 + fr * coef) * dp
                        scores.append(types.ReplicaScore(rid, score, matched, fr))
                        if lfu:
                            credits[rid] = [
                                _Credit(w.replica, k, self._lock) for k in req.block_hashes[: w.blocks]
                            ]
                else:
                    hits: list[tuple[_Replica, int, float]] = []
                    for rs in sc.replicas.values():
                        v = rs.entries.get(req.prefix_hash)
                        if v is None:
                            continue
                        fr = ranking.freshness((now_us - (v >> _TS_SHIFT)) / 1e6, ttl)
                        if fr > 0:
                            hits.append((rs, v & _TOK_MASK, fr))
                    dp = ranking.distinguishing_power(len(hits), total)
                    for rs, tok, fr in hits:
                        rid = rs.replica_id
                        pf = self._pressure_factor(s.tenant, s.model, rid, now_us, ttl)
                        scores.append(types.ReplicaScore(rid, tok * fr * pf * (1 + fr * coef) * dp, tok, fr))
                        if lfu and tok > 0:
                            credits[rid] = [_Credit(rs, req.prefix_hash, self._lock)]
            if scores:
                return types.LookupResult(types.Strategy.PREFIX_MATCH, ranking.sort_scores(scores)), credits
            if not chain:
                hot = self._tenant_hot_locked(s, sc, now_us, coef)
                if hot:
                    return types.LookupResult(types.Strategy.TENANT_HOT, ranking.sort_scores(hot)), {}
            return types.LookupResult(self._classify_miss_locked(s)), {}

    def _tenant_hot_locked(
        self, s: types.Scope, sc: _Scope | None, now_us: int, coef: float
    ) -> list[types.ReplicaScore]:
        max_age = self.settings.tenant_hot_max_age_s
        if max_age <= 0 or sc is None:
            return []
        out: list[types.ReplicaScore] = []
        for rid in self._stats_by_tm.get((s.tenant, s.model), ()):
            st = self._stats[(s.tenant, s.model, rid)]
            age = (now_us - st.reported_us) / 1e6
            hit = st.stats.hit_rate
            if age >= max_age or hit < self.settings.tenant_hot_min_hit_rate or rid not in sc.replicas:
                continue
            recency = 1.0 if age <= 0 else min(max(1.0 - age / max_age, 0.0), 1.0)
            pf = ranking.pressure_factor(st.stats.pressure, self.settings.pressure_weight)
            out.append(types.ReplicaScore(rid, hit * recency * pf * (1 + recency * coef), 0, hit))
        return out

    def _classify_miss_locked(self, s: types.Scope) -> types.Strategy:
        """Outer-to-inner miss codes; an empty index (cold start) is a plain miss."""
        if self.total_entries == 0:
            return types.Strategy.NONE
        if self._tenant_keys.get(s.tenant, 0) == 0:
            return types.Strategy.UNKNOWN_TENANT
        scopes = self._by_tm.get((s.tenant, s.model))
        if not scopes:
            return types.Strategy.UNKNOWN_MODEL
        if not any(sc.key.hash_scheme == s.hash_scheme for sc in scopes):
            return types.Strategy.UNKNOWN_HASH_SCHEME
        return types.Strategy.NONE

    def lookup_route(
        self, req: types.LookupRequest, policy: policy_mod.NamespacePolicy
    ) -> types.LookupResult:
        """The index side of HEAD's ``LookupRoute`` (seed §7.2 f), in order: probe tenant,
        ``requireChain`` gate, ``minimumPrefixTokens`` pre-gate (only when affinity routing
        is off), ``enableChainMatching`` (strip chain), ``lookup``, ``enableTenantHot``,
        ``minimumPrefixTokens`` post-gate, ``minimumMatchedTokens`` per-replica filter,
        ``routingFloorScore``, then AFFINITY_HINT for answers that ended as NO_HINT.

        Deadlines and token/prompt resolution are the server's (it calls this with the
        resolved chain, so it must check ``requireChain`` on the wire request itself).
        LFU hits are captured into the result and credited only by ``credit_hits()``. The
        AFFINITY_HINT seed is the request's chain as given (even when chain matching is off)."""
        none = types.LookupResult(types.Strategy.NONE)
        gates = policy.strategy
        s = req.scope
        if s.tenant == PROBE_TENANT:
            return none
        wire_chain = bool(req.block_hashes) and len(req.block_hashes) == len(req.block_token_counts)
        if gates.require_chain and not wire_chain:
            return types.LookupResult(types.Strategy.POLICY_REQUIRES_CHAIN)
        effective = ranking.effective_prefix_tokens(req)
        min_prefix = policy.minimum_prefix_tokens
        short = min_prefix > 0 and effective < min_prefix
        if short and not policy.affinity_routing:
            return none
        inner = req
        if not gates.enable_chain_matching and (req.block_hashes or req.block_token_counts):
            inner = types.LookupRequest(
                s,
                req.prefix_hash,
                req.token_count,
                ttft_budget_ms=req.ttft_budget_ms,
                tbt_budget_ms=req.tbt_budget_ms,
            )
        result, credits = self._lookup(inner)
        strategy, scores = result.strategy, result.scores
        if strategy is types.Strategy.TENANT_HOT and not gates.enable_tenant_hot:
            strategy, scores = types.Strategy.NONE, []
        if short and strategy in (types.Strategy.PREFIX_MATCH, types.Strategy.TENANT_HOT):
            strategy, scores = types.Strategy.NONE, []
        if strategy is types.Strategy.PREFIX_MATCH:
            floor = policy.minimum_matched_tokens
            if floor > 0:
                scores = [sc for sc in scores if sc.matched_tokens >= floor]
            if not scores or scores[0].score < max(policy.routing_floor_score, 0.0):
                strategy, scores = types.Strategy.NONE, []
        if strategy is types.Strategy.NONE and policy.affinity_routing:
            pick = self._affinity_pick(req)
            if pick is not None:
                return types.LookupResult(
                    types.Strategy.AFFINITY_HINT, [types.ReplicaScore(pick, 0.0, 0, 0.0)]
                )
        out = types.LookupResult(strategy, scores)
        if strategy is types.Strategy.PREFIX_MATCH:
            out._credit = [c for sc in scores for c in credits.get(sc.replica_id, ())]
        return out

    def _affinity_pick(self, req: types.LookupRequest) -> str | None:
        s = req.scope
        if not (s.tenant and s.model and s.hash_scheme):
            return None
        if len(req.block_hashes) != len(req.block_token_counts):
            return None
        seed = ranking.affinity_seed(req.block_hashes, req.prefix_hash)
        if not seed:
            return None
        with self._lock:
            sc = self._scopes.get(s)
            replicas = list(sc.replicas) if sc is not None else []
        return ranking.affinity_pick(seed, replicas) if replicas else None

    def lookup_tokens(
        self,
        scope: types.Scope,
        keys: Sequence[bytes],
        policy: policy_mod.NamespacePolicy,
        *,
        ttft_budget_ms: int = 0,
        replica_count: int = 0,
    ) -> types.LookupResult:
        """Token-keyed LookupResult (LookupRoute with ``token_ids``, the ext_proc scorer).

        Every replica with a fresh leading run is scored with the chain formula
        ``matched_tokens x freshness x pressure factor x SLO bias x dp`` (``matched_tokens``
        = the last matched entry's token count), best first: score, then the longer run,
        then replica id (so a run every replica holds, dp 0, still lists the longest
        first). ``dp`` divides by ``max(replica_count, replicas with entries in the
        scope)``: the caller passes the number of candidate replicas (the model's
        configured endpoints), so replicas that hold nothing yet count. Policy floors never remove or
        rewrite entries: they only choose the reason. The strategy is PREFIX_MATCH when the
        best run has ``matched_tokens >= minimumMatchedTokens`` and ``score >=
        routingFloorScore``, else NONE (NO_HINT) with the scores kept. Affinity is not
        applied here. LFU hits (every block of every run) are captured only for PREFIX_MATCH.
        Replicas without a matched block are omitted."""
        now_us = _to_us(self._clock())
        ttl = self.policies.ttl_s(scope.tenant)
        coef = ranking.slo_coef(ttft_budget_ms, self.settings.slo_tight_ttft_ms, self.settings.slo_tight_bias)
        scores: list[types.ReplicaScore] = []
        credit: list[_Credit] = []
        with self._lock:
            sc = self._scopes.get(scope)
            if sc is None or not keys:
                return types.LookupResult(types.Strategy.NONE)
            walks = self._walk(sc, keys, now_us - _to_us(ttl))
            dps = ranking.chain_dp_factors(
                [w.last_tokens for w in walks], max(replica_count, len(sc.replicas))
            )
            for w, dp in zip(walks, dps, strict=True):
                rid = w.replica.replica_id
                fr = ranking.freshness((now_us - w.oldest_us) / 1e6, ttl)
                pf = self._pressure_factor(scope.tenant, scope.model, rid, now_us, ttl)
                scores.append(
                    types.ReplicaScore(rid, w.last_tokens * fr * pf * (1 + fr * coef) * dp, w.last_tokens, fr)
                )
            if self.policies.is_lfu(scope.tenant):
                credit = [_Credit(w.replica, k, self._lock) for w in walks for k in keys[: w.blocks]]
        scores.sort(key=lambda s: (-s.score, -s.matched_tokens, s.replica_id))
        best = scores[0] if scores else None
        passes = (
            best is not None
            and best.matched_tokens >= policy.minimum_matched_tokens
            and best.score >= max(policy.routing_floor_score, 0.0)
        )
        out = types.LookupResult(types.Strategy.PREFIX_MATCH if passes else types.Strategy.NONE, scores)
        if passes:
            out._credit = list(credit)
        return out

    # -- reads -------------------------------------------------------------------------------
    def cache_state(self, tenant: str, model: str) -> types.CacheState:
        """``GetCacheState``: stats under exact ``(tenant, model)`` sorted by replica id, and
        the distinct prefix keys under ``(tenant, model)`` across schemes and adapters."""
        with self._lock:
            rows = tuple(
                types.ReplicaStatsRow(rid, self._stats[(tenant, model, rid)].stats)
                for rid in sorted(self._stats_by_tm.get((tenant, model), ()))
            )
            total = sum(sc.distinct for sc in self._by_tm.get((tenant, model), ()))
        return types.CacheState(rows, total)

    def aggregate(self) -> types.Aggregate:
        with self._lock:
            per = {t: n for t, n in self._tenant_keys.items() if n > 0}
        return types.Aggregate(per, sum(per.values()))

    @property
    def distinct_prefixes(self) -> int:
        """Distinct prefix keys over every scope (``Aggregate().total``)."""
        return sum(self._tenant_keys.values())

    @property
    def scope_count(self) -> int:
        return len(self._scopes)

    @property
    def stats_count(self) -> int:
        return len(self._stats)

    def entries_by_model(self) -> dict[str, int]:
        """Distinct prefix keys per model for ``inferencecache_index_entries{model}``; models
        that held entries before and are drained now report 0."""
        with self._lock:
            out = dict.fromkeys(self._reported_models, 0)
            for sc in self._scopes.values():
                out[sc.key.model] += sc.distinct
        return out

    def snapshot(self) -> snapshot.Snapshot:
        """The ``/snapshot`` domain view (seed §4.8); ``snapshot.encode_json`` gives the bytes."""
        with self._lock:
            latest: dict[tuple[str, str], _Stat] = {}
            for (t, _m, r), st in self._stats.items():
                cur = latest.get((t, r))
                if cur is None or st.last_seen_us > cur.last_seen_us:
                    latest[(t, r)] = st
            counts: Counter[tuple[str, str]] = Counter()
            newest: dict[tuple[str, str], int] = {}
            for sc in self._scopes.values():
                t = sc.key.tenant
                for rs in sc.replicas.values():
                    key = (t, rs.replica_id)
                    counts[key] += len(rs.entries)
                    top = max((v >> _TS_SHIFT for v in rs.entries.values()), default=0)
                    newest[key] = max(newest.get(key, 0), top)
            tenant_keys = dict(self._tenant_keys)
        rows = []
        for t, r in sorted(set(latest) | set(counts)):
            row_stat = latest.get((t, r))
            stats = row_stat.stats if row_stat is not None else types.ReplicaStats()
            rows.append(
                snapshot.ReplicaRow(
                    replica_id=r,
                    tenant=t,
                    cache_memory_bytes=stats.cache_memory_bytes,
                    hit_rate=stats.hit_rate,
                    pressure=stats.pressure,
                    last_update_ns=row_stat.last_seen_us * 1000 if row_stat is not None else None,
                    prefix_count=counts.get((t, r), 0),
                    last_event_at_ns=newest[(t, r)] * 1000 if (t, r) in newest else None,
                )
            )
        tenants = []
        for t in sorted({t for t, _r in latest} | {t for t, n in tenant_keys.items() if n > 0}):
            mine = [st.stats for (tt, _r), st in latest.items() if tt == t]
            rates = [snapshot.to_float32(x.hit_rate) for x in mine]
            tenants.append(
                snapshot.TenantRow(
                    tenant_id=t,
                    memory_used=sum(x.cache_memory_bytes for x in mine),
                    index_entries=tenant_keys.get(t, 0),
                    hit_rate=sum(rates) / len(rates) if rates else 0.0,
                )
            )
        return snapshot.Snapshot(tuple(rows), tuple(tenants), sum(tenant_keys.values()))
