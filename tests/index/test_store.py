"""Index writes and reads: ingest forms, events, TTL sweep, cap eviction (LRU/LFU with the
original tie-break), tenant quota, LFU credit, listeners, GetCacheState/aggregate/gauges.
Time is a fake clock; nothing sleeps."""

from __future__ import annotations

from inference_cache.index import policy, store, types

S = types.Scope("t", "m", "vllm")
E = types.EventType


def keys_of(index: store.Index, scope: types.Scope = S) -> dict[str, list[int]]:
    """replica -> sorted first bytes of the keys it holds (via exact lookups of 1-byte keys)."""
    out: dict[str, list[int]] = {}
    for b in range(16):
        res = index.lookup(types.LookupRequest(scope, prefix_hash=bytes([b])))
        if res.strategy is types.Strategy.PREFIX_MATCH:
            for sc in res.scores:
                out.setdefault(sc.replica_id, []).append(b)
    return out


def put(index: store.Index, replica: str, *ks: int, scope: types.Scope = S, ts: float | None = None) -> None:
    index.blocks_stored(scope, replica, [bytes([k]) for k in ks], [100] * len(ks), ts)


def test_chain_ingest_stores_cumulative_counts_and_co_set_legacy_hash(index: store.Index) -> None:
    entry = types.PrefixEntry(
        prefix_hash=b"L", token_count=7, block_hashes=[b"a", b"b"], block_token_counts=[16, 16]
    )
    index.ingest(types.Update("r", S, [entry]))
    assert index.longest_prefix(S, [b"a", b"b"])[0].matched_tokens == 32
    assert index.lookup(types.LookupRequest(S, prefix_hash=b"L")).scores[0].matched_tokens == 7
    assert index.total_entries == 3


def test_mismatched_chain_and_empty_scheme_are_dropped(index: store.Index) -> None:
    bad = types.PrefixEntry(block_hashes=[b"a", b"b"], block_token_counts=[16])
    index.ingest(types.Update("r", S, [bad]))
    index.ingest(types.Update("r", types.Scope("t", "m", ""), [types.PrefixEntry(b"x", 5)]))
    assert index.total_entries == 0


def test_stats_sanitized_and_kept_with_empty_scheme(index: store.Index) -> None:
    stats = types.ReplicaStats(10, float("nan"), float("inf"))
    index.ingest(types.Update("r", types.Scope("t", "m", ""), stats=stats))
    state = index.cache_state("t", "m")
    assert state.replicas == (types.ReplicaStatsRow("r", types.ReplicaStats(10, 0.0, 0.0)),)


def test_prefix_evicted_is_conservative_across_schemes(index: store.Index) -> None:
    other = types.Scope("t", "m", "sglang")
    put(index, "r", 1, 2)
    put(index, "r", 1, scope=other)
    put(index, "r2", 1)
    index.apply_event(types.Event(E.PREFIX_EVICTED, "r", model="m", tenant="t", prefix_hash=b"\x01"))
    assert keys_of(index) == {"r": [2], "r2": [1]}
    assert keys_of(index, other) == {}


def test_all_cleared_drops_entries_in_every_scope_and_stats(index: store.Index) -> None:
    put(index, "r", 1)
    put(index, "r", 2, scope=types.Scope("t", "m", "vllm", "lora-a"))
    put(index, "r", 3, scope=types.Scope("t", "other", "vllm"))
    index.set_stats(tenant="t", model="m", replica_id="r", stats=types.ReplicaStats(1, 0.5, 0.1))
    index.replica_cleared("r", model="m", tenant="t")
    assert index.total_entries == 1
    assert index.cache_state("t", "m") == types.CacheState((), 0)


def test_replica_updated_is_liveness_only_and_prefix_added_is_noop(index: store.Index, clock) -> None:
    index.set_stats(tenant="t", model="m", replica_id="r", stats=types.ReplicaStats(1, 0.5, 0.0))
    put(index, "r", 1)
    clock.t += 400  # stats payload older than TENANT_HOT max age (300 s)
    index.apply_event(types.Event(E.REPLICA_UPDATED, "r", "m", "t"))
    index.apply_event(types.Event(E.PREFIX_ADDED, "r", "m", "t", prefix_hash=b"\x09"))
    res = index.lookup(types.LookupRequest(S, prefix_hash=b"\x05"))
    assert res.strategy is types.Strategy.NONE
    assert index.total_entries == 1


def test_ttl_sweep_is_per_tenant_and_counts(index: store.Index, clock, policies: policy.PolicyStore) -> None:
    policies.replace([policy.NamespacePolicy("a", eviction_ttl_s=10)])
    sa, sb = types.Scope("a", "m", "vllm"), types.Scope("b", "m", "vllm")
    put(index, "r", 1, scope=sa)
    put(index, "r", 1, scope=sb)
    index.set_stats(tenant="a", model="m", replica_id="r", stats=types.ReplicaStats())
    clock.t += 9.9
    index.sweep()
    assert index.total_entries == 2
    clock.t += 0.1
    index.sweep()
    assert keys_of(index, sa) == {}
    assert keys_of(index, sb) == {"r": [1]}
    assert index.stats_count == 0
    assert index.index_evictions == {("lru", "ttl"): 1}
    assert index.entries_by_model() == {"m": 1}


def test_cap_evicts_least_recently_seen(clock, policies: policy.PolicyStore) -> None:
    index = store.Index(store.IndexSettings(max_entries=3), policies=policies, clock=clock)
    for k in (1, 2, 3):
        put(index, "r", k)
        clock.t += 1
    put(index, "r", 1)  # refresh: 1 is now the newest
    clock.t += 1
    put(index, "r", 4)
    assert keys_of(index) == {"r": [1, 3, 4]}
    assert index.index_evictions == {("lru", "cap"): 1}


def test_cap_tie_break_is_tenant_model_scheme_key_replica(clock, policies: policy.PolicyStore) -> None:
    index = store.Index(store.IndexSettings(max_entries=4), policies=policies, clock=clock)
    put(index, "rb", 2, 1)
    put(index, "ra", 2, 1)
    put(index, "ra", 9, scope=types.Scope("u", "m", "vllm"))  # same time, later tenant
    assert keys_of(index) == {"ra": [2], "rb": [1, 2]}  # (t, m, vllm, "", key 1, ra) went first


def test_cap_out_of_order_timestamps_still_oldest_first(clock, policies: policy.PolicyStore) -> None:
    index = store.Index(store.IndexSettings(max_entries=2), policies=policies, clock=clock)
    put(index, "r", 1, ts=clock.t - 100)
    put(index, "r", 2, ts=clock.t - 150)  # older, written later
    put(index, "r", 3, ts=clock.t)
    assert keys_of(index) == {"r": [1, 3]}


def test_lfu_cap_evicts_lowest_count_then_oldest(clock, policies: policy.PolicyStore) -> None:
    policies.replace([policy.NamespacePolicy("t", eviction="lfu", minimum_matched_tokens=0)])
    index = store.Index(store.IndexSettings(max_entries=3), policies=policies, clock=clock)
    for k in (1, 2, 3):
        put(index, "r", k)
        clock.t += 1
    res = index.lookup(types.LookupRequest(S, prefix_hash=b"\x01"))
    put(index, "r", 1)  # a refresh never resets the counter
    index.lookup(types.LookupRequest(S, prefix_hash=b"\x02"))  # not delivered: no credit
    res.credit_hits()
    res.credit_hits()  # idempotent
    put(index, "r", 4)
    assert keys_of(index) == {"r": [1, 3, 4]}
    assert index.index_evictions == {("lfu", "cap"): 1}


def test_lru_tenant_lookups_credit_nothing(index: store.Index) -> None:
    put(index, "r", 1)
    res = index.lookup(types.LookupRequest(S, prefix_hash=b"\x01"))
    assert res._credit == []


def test_quota_counts_multi_replica_keys_once_and_evicts_oldest(
    index: store.Index, clock, policies: policy.PolicyStore
) -> None:
    policies.replace([], [policy.TenantQuota("t", 2)])
    put(index, "r1", 1)
    put(index, "r1", 2)
    clock.t += 1
    put(index, "r2", 1)
    assert index.aggregate() == types.Aggregate({"t": 2}, 2)
    clock.t += 1
    put(index, "r1", 3)
    # key 2 (freshest holder at t+0) is older than key 1 (r2 at t+1)
    assert keys_of(index) == {"r1": [1, 3], "r2": [1]}
    assert index.tenant_evictions == {"t": 1}
    put(index, "r1", 4, scope=types.Scope("other", "m", "vllm"))
    assert index.aggregate().per_tenant == {"t": 2, "other": 1}


def test_zero_quota_admits_nothing(index: store.Index, policies: policy.PolicyStore) -> None:
    policies.replace([], [policy.TenantQuota("t", 0)])
    put(index, "r", 1, 2)
    assert index.total_entries == 0
    assert index.tenant_evictions == {"t": 2}


def test_listeners_receive_adds_evictions_clears_and_stats(index: store.Index) -> None:
    seen: list[tuple[types.EventType, str, bytes]] = []
    stop = index.add_listener(lambda ev: seen.append((ev.type, ev.replica_id, ev.prefix_hash)))
    put(index, "r", 1)
    put(index, "r", 1)  # refresh: no add
    index.blocks_removed(S, "r", [b"\x01"])
    index.set_stats(tenant="t", model="m", replica_id="r", stats=types.ReplicaStats())
    index.replica_cleared("r", model="m", tenant="t")
    stop()
    put(index, "r", 2)
    assert seen == [
        (E.PREFIX_ADDED, "r", b"\x01"),
        (E.PREFIX_EVICTED, "r", b"\x01"),
        (E.REPLICA_UPDATED, "r", b""),
        (E.ALL_CLEARED, "r", b""),
    ]


def test_reads_cache_state_and_drained_model_gauge(index: store.Index) -> None:
    put(index, "r", 1, 2)
    put(index, "r2", 2, scope=types.Scope("t", "m", "sglang"))
    index.set_stats(tenant="t", model="m", replica_id="z", stats=types.ReplicaStats(5, 0.5, 0.1))
    index.set_stats(tenant="t", model="m", replica_id="a", stats=types.ReplicaStats(6, 0.5, 0.1))
    state = index.cache_state("t", "m")
    assert [r.replica_id for r in state.replicas] == ["a", "z"]
    assert state.total_prefixes == 3
    assert index.entries_by_model() == {"m": 3}
    index.replica_cleared("r", model="m", tenant="t")
    index.replica_cleared("r2", model="m", tenant="t")
    assert index.entries_by_model() == {"m": 0}
    assert index.total_entries == 0
    assert index.scope_count == 0


def test_ready_follows_start_stop(index: store.Index) -> None:
    assert not index.ready
    index.start()
    assert index.ready
    index.stop()
    assert not index.ready


def test_adapters_and_schemes_partition_keys(index: store.Index) -> None:
    lora = types.Scope("t", "m", "vllm", "lora-a")
    put(index, "r", 1)
    put(index, "r", 2, scope=lora)
    assert keys_of(index) == {"r": [1]}
    assert keys_of(index, lora) == {"r": [2]}
    index.ingest(types.Update("r", S, [types.PrefixEntry(b"\x03", 5, adapter="lora-a")]))
    assert keys_of(index, lora) == {"r": [2, 3]}
    # PREFIX_EVICTED matches the event's adapter ("" = base model) only.
    index.apply_event(types.Event(E.PREFIX_EVICTED, "r", model="m", tenant="t", prefix_hash=b"\x02"))
    assert keys_of(index, lora) == {"r": [2, 3]}
    index.apply_event(types.Event(E.PREFIX_EVICTED, "r", "m", "t", b"\x02", adapter="lora-a"))
    assert keys_of(index, lora) == {"r": [3]}


def test_blocks_removed_exact_scope_only(index: store.Index) -> None:
    put(index, "r", 1, 2)
    put(index, "r", 1, scope=types.Scope("t", "m", "sglang"))
    index.blocks_removed(S, "r", [b"\x01", b"\x09"])
    assert keys_of(index) == {"r": [2]}
    assert keys_of(index, types.Scope("t", "m", "sglang")) == {"r": [1]}
    assert index.total_entries == 2
