"""Lookups: exact / chain / TENANT_HOT paths, the chain walk, dp, miss codes, the HEAD
orchestration (``lookup_route``: gates, floors, AFFINITY_HINT, LFU capture) and the
token-keyed path (``longest_prefix``, ``lookup_tokens``). Fake clock only."""

from __future__ import annotations

import hashlib

import pytest

from inference_cache.index import policy, store, types

S = types.Scope("t", "m", "vllm")
ST = types.Strategy
OPEN = policy.NamespacePolicy("t", minimum_matched_tokens=0, routing_floor_score=0, affinity_routing=False)


def blocks(*names: str) -> list[bytes]:
    return [n.encode() for n in names]


def store_chain(index: store.Index, replica: str, names: str, ts: float | None = None, scope=S) -> None:
    ks = blocks(*names)
    index.blocks_stored(scope, replica, ks, [16 * (i + 1) for i in range(len(ks))], ts)


def chain_req(names: str, scope=S, **kw) -> types.LookupRequest:
    ks = blocks(*names)
    return types.LookupRequest(scope, block_hashes=ks, block_token_counts=[16] * len(ks), **kw)


def by_id(res: types.LookupResult) -> dict[str, types.ReplicaScore]:
    return {s.replica_id: s for s in res.scores}


def test_chain_walk_longest_run_drop_out_is_final_seed_only_at_block_0(index: store.Index, clock) -> None:
    store_chain(index, "a", "wxyz", ts=clock.t - 900)  # weakest link: half the 30 min TTL
    index.blocks_stored(S, "a", blocks(*"xyz"), [32, 48, 64])  # refresh all but block 0
    store_chain(index, "b", "wxz")  # misses y: its run stops at 2 even though it holds z
    store_chain(index, "c", "xyz")  # no block 0: never seeded
    matches = index.longest_prefix(S, blocks(*"wxyz"))
    assert [(m.replica_id, m.matched_blocks, m.matched_tokens) for m in matches] == [
        ("a", 4, 64),
        ("b", 2, 32),
    ]
    assert matches[0].freshness == pytest.approx(0.5)
    assert matches[1].freshness == 1.0
    res = index.lookup(chain_req("wxyz"))
    assert res.strategy is ST.PREFIX_MATCH
    assert {s.replica_id: s.matched_tokens for s in res.scores} == {"a": 64, "b": 32}


def test_dp_factor_256_128_64(index: store.Index) -> None:
    names = "abcdefghijklmnop"
    store_chain(index, "r1", names)
    store_chain(index, "r2", names[:8])
    store_chain(index, "r3", names[:4])
    res = index.lookup(chain_req(names))
    assert [(s.replica_id, s.matched_tokens) for s in res.scores] == [("r1", 256), ("r2", 128), ("r3", 64)]
    assert [s.score for s in res.scores] == pytest.approx([170.67, 42.67, 0.0], abs=0.01)


def test_exact_path_scores_tokens_freshness_pressure_slo_and_uniform_dp(index: store.Index, clock) -> None:
    index.blocks_stored(S, "busy", [b"k"], [100], clock.t - 720)  # freshness 0.6
    index.blocks_stored(S, "idle", [b"k"], [50])
    index.blocks_stored(S, "other", [b"q"], [10])  # 3 replicas in scope, 2 match: dp = 1/3
    index.set_stats(tenant="t", model="m", replica_id="busy", stats=types.ReplicaStats(pressure=0.5))
    res = index.lookup(types.LookupRequest(S, prefix_hash=b"k", ttft_budget_ms=50))
    got = by_id(res)
    assert got["busy"].score == pytest.approx(100 * 0.6 * 0.5 * 1.6 / 3)
    assert got["idle"].score == pytest.approx(50 * 1.0 * 1.0 * 2.0 / 3)
    assert got["busy"].estimated_cache_hit_prob == pytest.approx(0.6)
    assert [s.replica_id for s in res.scores] == ["idle", "busy"]


def test_stale_stats_pressure_is_ignored(index: store.Index, clock) -> None:
    index.set_stats(
        tenant="t", model="m", replica_id="r", stats=types.ReplicaStats(pressure=0.9), ts=clock.t - 1800
    )
    index.blocks_stored(S, "r", [b"k"], [100])
    assert index.lookup(types.LookupRequest(S, prefix_hash=b"k")).scores[0].score == pytest.approx(100)


def test_tenant_hot_worked_number(index: store.Index, clock) -> None:
    index.blocks_stored(S, "r", [b"other"], [16])
    index.set_stats(
        tenant="t", model="m", replica_id="r", stats=types.ReplicaStats(0, 0.8, 0.1), ts=clock.t - 30
    )
    index.set_stats(tenant="t", model="m", replica_id="cold", stats=types.ReplicaStats(0, 0.05, 0.0))
    res = index.lookup(types.LookupRequest(S, prefix_hash=b"miss"))
    assert res.strategy is ST.TENANT_HOT
    assert [(s.replica_id, s.matched_tokens) for s in res.scores] == [("r", 0)]
    assert res.scores[0].score == pytest.approx(0.648)
    assert res.scores[0].estimated_cache_hit_prob == pytest.approx(0.8)


@pytest.mark.parametrize(
    "req",
    [
        pytest.param(chain_req("zz"), id="no-overlap"),
        pytest.param(types.LookupRequest(S, block_hashes=[b"a"], block_token_counts=[]), id="mismatched"),
    ],
)
def test_chains_never_fall_to_tenant_hot(index: store.Index, req: types.LookupRequest) -> None:
    index.blocks_stored(S, "r", [b"a"], [16])
    index.set_stats(tenant="t", model="m", replica_id="r", stats=types.ReplicaStats(0, 0.9, 0.0))
    assert index.lookup(req).strategy is ST.NONE
    assert index.lookup(types.LookupRequest(S, prefix_hash=b"zz")).strategy is ST.TENANT_HOT


def test_miss_codes_outer_to_inner_with_cold_start(index: store.Index) -> None:
    def miss(scope: types.Scope) -> types.Strategy:
        return index.lookup(types.LookupRequest(scope, prefix_hash=b"nope")).strategy

    assert miss(S) is ST.NONE  # empty index: cold start is a plain miss
    index.blocks_stored(S, "r", [b"a"], [16])
    assert miss(types.Scope("x", "m", "vllm")) is ST.UNKNOWN_TENANT
    assert miss(types.Scope("t", "x", "vllm")) is ST.UNKNOWN_MODEL
    assert miss(types.Scope("t", "m", "sglang")) is ST.UNKNOWN_HASH_SCHEME
    assert miss(S) is ST.NONE
    assert miss(types.Scope("t", "m", "")) is ST.NONE


def test_lookup_route_gates(index: store.Index) -> None:
    store_chain(index, "r", "abcd")
    index.set_stats(tenant="t", model="m", replica_id="r", stats=types.ReplicaStats(0, 0.9, 0.0))
    need_chain = policy.NamespacePolicy(strategy=policy.StrategyGates(require_chain=True))
    exact = types.LookupRequest(S, prefix_hash=b"d", token_count=64)
    assert index.lookup_route(exact, need_chain).strategy is ST.POLICY_REQUIRES_CHAIN
    no_chain = policy.NamespacePolicy(
        minimum_matched_tokens=0, strategy=policy.StrategyGates(enable_chain_matching=False)
    )
    res = index.lookup_route(
        types.LookupRequest(S, prefix_hash=b"d", block_hashes=blocks(*"abcd"), block_token_counts=[16] * 4),
        no_chain,
    )
    assert res.strategy is ST.PREFIX_MATCH and res.scores[0].matched_tokens == 64  # exact key d
    no_hot = policy.NamespacePolicy(
        affinity_routing=False, strategy=policy.StrategyGates(enable_tenant_hot=False)
    )
    assert index.lookup(types.LookupRequest(S, prefix_hash=b"zz")).strategy is ST.TENANT_HOT
    assert index.lookup_route(types.LookupRequest(S, prefix_hash=b"zz"), no_hot).strategy is ST.NONE
    probe = types.Scope(store.PROBE_TENANT, "m", "vllm")
    assert index.lookup_route(types.LookupRequest(probe, prefix_hash=b"d"), OPEN).strategy is ST.NONE


def test_minimum_prefix_tokens_pre_and_post_gate(index: store.Index) -> None:
    store_chain(index, "r", "abcd")
    strict = policy.NamespacePolicy(
        minimum_prefix_tokens=100, minimum_matched_tokens=0, affinity_routing=False
    )
    assert index.lookup_route(chain_req("abcd"), strict).strategy is ST.NONE
    with_affinity = policy.NamespacePolicy(minimum_prefix_tokens=100, minimum_matched_tokens=0)
    res = index.lookup_route(chain_req("abcd"), with_affinity)
    assert res.strategy is ST.AFFINITY_HINT
    assert res.scores == [types.ReplicaScore("r", 0.0, 0, 0.0)]
    assert res._credit == []


def test_minimum_matched_tokens_and_routing_floor(index: store.Index) -> None:
    store_chain(index, "deep", "abcdefgh")
    store_chain(index, "shallow", "ab")
    store_chain(index, "x", "q")
    floor = policy.NamespacePolicy(minimum_matched_tokens=64, routing_floor_score=0, affinity_routing=False)
    res = index.lookup_route(chain_req("abcdefgh"), floor)
    assert [s.replica_id for s in res.scores] == ["deep"]
    high = policy.NamespacePolicy(minimum_matched_tokens=0, routing_floor_score=1000, affinity_routing=False)
    assert index.lookup_route(chain_req("abcdefgh"), high).strategy is ST.NONE
    # Everyone holds "q": dp = 0 -> score 0 < default floor 0.1 -> no hint.
    store_chain(index, "deep", "q")
    store_chain(index, "shallow", "q")
    everyone = policy.NamespacePolicy(minimum_matched_tokens=0, affinity_routing=False)
    assert index.lookup_route(types.LookupRequest(S, prefix_hash=b"q"), everyone).strategy is ST.NONE


def test_affinity_hint_is_deterministic_sha256_pick(index: store.Index) -> None:
    for r in ("r2", "r0", "r1"):
        index.blocks_stored(S, r, [r.encode()], [16])
    req = chain_req("uv")
    res = index.lookup_route(req, policy.NamespacePolicy())
    seed = b"\x00\x00\x00\x01u\x00\x00\x00\x01v"
    n = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big")
    assert res.strategy is ST.AFFINITY_HINT
    assert res.scores[0].replica_id == ["r0", "r1", "r2"][n % 3]
    assert index.lookup_route(req, policy.NamespacePolicy()).scores == res.scores
    empty_seed = types.LookupRequest(S)
    assert index.lookup_route(empty_seed, policy.NamespacePolicy()).strategy is ST.NONE


def test_lfu_credit_captured_only_for_delivered_prefix_match(index: store.Index, policies) -> None:
    policies.replace([policy.NamespacePolicy("t", eviction="lfu")])
    store_chain(index, "deep", "abcdef")
    store_chain(index, "shallow", "ab")
    lfu = policy.NamespacePolicy("t", eviction="lfu", minimum_matched_tokens=64, routing_floor_score=0)
    res = index.lookup_route(chain_req("abcdef"), lfu)
    assert [s.replica_id for s in res.scores] == ["deep"]
    assert len(res._credit) == 6  # every block of the surviving run, none of the pruned one
    assert all(c.access_count == 0 for c in res._credit)  # type: ignore[attr-defined]
    res.credit_hits()
    again = index.lookup_route(chain_req("abcdef"), lfu)
    assert [c.access_count for c in again._credit] == [1] * 6  # type: ignore[attr-defined]


def test_lookup_tokens_keeps_scores_and_only_picks_reason(index: store.Index) -> None:
    store_chain(index, "deep", "abcdefgh")
    store_chain(index, "shallow", "ab")
    res = index.lookup_tokens(S, blocks(*"abcdefgh"), policy.NamespacePolicy())
    assert res.strategy is ST.PREFIX_MATCH
    assert [(s.replica_id, s.matched_tokens) for s in res.scores] == [("deep", 128), ("shallow", 32)]
    assert res.scores[0].score == pytest.approx(128 * 0.5)
    assert res.scores[1].score == 0.0
    short = index.lookup_tokens(S, blocks(*"ab"), policy.NamespacePolicy())
    assert short.strategy is ST.NONE  # 32 tokens < minimumMatchedTokens 64
    assert [s.replica_id for s in short.scores] == ["deep", "shallow"]
    assert index.lookup_tokens(S, blocks(*"zz"), policy.NamespacePolicy()).scores == []


def test_lookup_tokens_lists_longest_first_when_every_holder_scores_zero(index: store.Index) -> None:
    # Both replicas with entries hold the first two blocks: dp is 0 for both runs.
    store_chain(index, "a-short", "ab")
    store_chain(index, "z-long", "abc")
    res = index.lookup_tokens(S, blocks(*"ab"), policy.NamespacePolicy())
    assert [s.score for s in res.scores] == [0.0, 0.0]
    res = index.lookup_tokens(S, blocks(*"abc"), policy.NamespacePolicy(minimum_matched_tokens=0))
    assert [(s.replica_id, s.matched_tokens) for s in res.scores] == [("z-long", 48), ("a-short", 32)]


def test_lookup_tokens_counts_candidates_that_hold_nothing(index: store.Index) -> None:
    # Two of three candidate replicas hold the prefix; the third has no entries yet.
    store_chain(index, "r1", "abcd")
    store_chain(index, "r2", "abcd")
    floor_off = policy.NamespacePolicy(minimum_matched_tokens=0)
    alone = index.lookup_tokens(S, blocks(*"abcd"), floor_off)
    assert alone.strategy is ST.NONE  # every replica the index knows holds it: dp 0
    counted = index.lookup_tokens(S, blocks(*"abcd"), floor_off, replica_count=3)
    assert counted.strategy is ST.PREFIX_MATCH
    assert [s.score for s in counted.scores] == pytest.approx([64 / 3, 64 / 3])
