"""``extproc.scoring``: the predicted-TTFT cost model and the ranking.

Pure functions, nothing mocked. We test: the terms of one prediction, cache vs load
(with the break-even quantified), ties spread across seeds and stable per seed, unknown
gauges, monotonicity, settings validation and the wire score.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from inference_cache.extproc import scoring
from inference_cache.extproc.scoring import Candidate, ScoringSettings

S = ScoringSettings()


def best(cands: list[Candidate], prompt: int, seed: bytes = b"seed") -> str:
    return scoring.rank(cands, prompt, S, seed=seed)[0].replica_id


def test_defaults_follow_the_fake_engine_time_model() -> None:
    from inference_cache.fakeengine.scheduler import TimeModel

    assert S.prefill_tokens_per_s == TimeModel().prefill_tokens_per_second
    # waiting: a 1,000-token prefill; kv: one 100-token response at the decode rate.
    assert S.waiting_request_ms == 1000 / TimeModel().prefill_tokens_per_second * 1000
    assert S.kv_full_penalty_ms == 100 / TimeModel().decode_tokens_per_second * 1000


def test_prediction_terms() -> None:
    c = Candidate(
        "a",
        matched_tokens=1000,
        inflight_requests=3,
        inflight_prefill_tokens=2000,
        engine_running=5,
        engine_waiting=2,
        kv_usage=0.95,
    )
    s = ScoringSettings(running_request_ms=2.0)
    got = scoring.predict(c, 5000, s)
    assert got.prefill_ms == pytest.approx(400.0)  # 4000 uncached tokens at 10k/s
    assert got.queue_ms == pytest.approx(200.0 + 3 * 1.0 + 5 * 2.0 + 2 * 100.0 + 500.0)
    assert got.predicted_ttft_ms == pytest.approx(got.queue_ms + got.prefill_ms)
    assert (got.replica_id, got.matched_tokens) == ("a", 1000)


def test_fully_cached_prompt_still_prefills_one_token() -> None:
    for matched in (100, 150):
        got = scoring.predict(Candidate("a", matched_tokens=matched), 100, S)
        assert got.prefill_ms == pytest.approx(0.1)
        assert got.matched_tokens == matched  # reported as the index said, never clamped


def test_cache_wins_when_queues_are_equal() -> None:
    load = {"inflight_requests": 4, "inflight_prefill_tokens": 3000, "engine_waiting": 1.0}
    cands = [Candidate("cold", **load), Candidate("warm", matched_tokens=512, **load)]  # type: ignore[arg-type]
    assert best(cands, 2048) == "warm"


def test_longer_match_wins() -> None:
    cands = [Candidate("short", matched_tokens=256), Candidate("long", matched_tokens=1024)]
    assert best(cands, 4096) == "long"


def test_load_wins_when_the_cached_replica_is_saturated() -> None:
    prompt, cached = 8500, 8192
    saved_ms = cached / S.prefill_tokens_per_s * 1000  # 819.2 ms of prefill saved

    def winner(waiting: int) -> str:
        return best([Candidate("warm", cached, engine_waiting=waiting), Candidate("idle")], prompt)

    break_even = math.ceil(saved_ms / S.waiting_request_ms)
    assert break_even == 9  # with the defaults: 8 waiting requests still stick, 9 shed
    assert winner(break_even - 1) == "warm"
    assert winner(break_even) == "idle"


def test_our_inflight_prefill_backlog_sheds_too() -> None:
    # By predicted TTFT alone (no congestion price): 8192 cached tokens save 819.2 ms; a
    # backlog of more tokens than that sends us away.
    s = ScoringSettings(recompute_congestion_weight=0)

    def winner(backlog: int) -> str:
        cands = [Candidate("warm", 8192, inflight_prefill_tokens=backlog), Candidate("idle")]
        return scoring.rank(cands, 8500, s, seed=b"seed")[0].replica_id

    assert winner(8000) == "warm"
    assert winner(8300) == "idle"


def test_congestion_prices_recomputing_so_a_backlogged_holder_keeps_its_prefix() -> None:
    # Default weight 2 per second of mean backlog; two candidates, so the price of each
    # prefill ms is k = 2 * (backlog / 2) / 10,000 tokens/s. The warm replica wins while
    # backlog/10 + (1 + k) * 30.8 < (1 + k) * 850, i.e. below 819.2 / (0.1 - 0.08192) ms
    # (prefix affinity off, so that the break-even is the cost's alone).
    s = ScoringSettings(affinity_tolerance_ms=0)
    break_even = 819.2 / (0.1 - 819.2 / 10_000)
    assert 45_300 < break_even < 45_320

    def ranked(backlog: int) -> list[scoring.Scored]:
        return scoring.rank(
            [Candidate("warm", 8192, inflight_prefill_tokens=backlog), Candidate("idle")],
            8500,
            s,
            seed=b"seed",
        )

    assert ranked(45_300)[0].replica_id == "warm"
    assert ranked(45_320)[0].replica_id == "idle"
    # The prediction itself is unchanged: only the ranking cost carries the price.
    warm = next(x for x in ranked(20_000) if x.replica_id == "warm")
    assert warm.predicted_ttft_ms == pytest.approx(2000 + 30.8)
    assert warm.cost_ms == pytest.approx(warm.predicted_ttft_ms + 2.0 * 30.8)  # k = 2 * 10,000 / 10,000


def test_congestion_is_the_weighted_mean_backlog_in_seconds() -> None:
    cands = [
        Candidate("a", inflight_prefill_tokens=30_000),
        Candidate("b", inflight_prefill_tokens=-5),
        Candidate("c"),
    ]
    assert scoring.congestion(cands, S) == pytest.approx(2.0 * (30_000 / 3) / 10_000)
    assert scoring.congestion(cands, ScoringSettings(recompute_congestion_weight=0)) == 0.0
    assert scoring.congestion([], S) == 0.0
    assert scoring.congestion([Candidate("idle")], S) == 0.0
    alone = scoring.predict(Candidate("a", 100), 1000, S)
    assert alone.cost_ms == alone.predicted_ttft_ms  # no fleet context: no price


def test_congestion_never_reorders_candidates_with_equal_matches() -> None:
    # Equal matches mean equal prefill everywhere: the price shifts every cost alike.
    rng = random.Random(7)
    flat = ScoringSettings(recompute_congestion_weight=0)
    for n in range(200):
        matched = rng.choice([0, 512, 4096])
        cands = [
            Candidate(
                f"r{i}",
                matched,
                inflight_requests=rng.randrange(10),
                inflight_prefill_tokens=rng.randrange(50_000),
                engine_waiting=rng.choice([None, 0.0, 2.0]),
            )
            for i in range(6)
        ]
        seed = bytes([n % 256])
        order = [x.replica_id for x in scoring.rank(cands, 8000, S, seed=seed)]
        assert order == [x.replica_id for x in scoring.rank(cands, 8000, flat, seed=seed)]


def test_near_full_kv_cache_is_penalised() -> None:
    cands = [Candidate("full", 1024, kv_usage=1.0), Candidate("roomy", 0, kv_usage=0.5)]
    assert best(cands, 2048) == "roomy"  # 1000 ms penalty > 102.4 ms saved
    below = [Candidate("busy", 1024, kv_usage=0.9), Candidate("roomy", 0, kv_usage=0.1)]
    assert best(below, 2048) == "busy"  # at the threshold: no penalty yet


def test_unknown_gauges_count_as_zero() -> None:
    unknown = scoring.predict(Candidate("a", engine_running=None, engine_waiting=None, kv_usage=None), 10, S)
    zero = scoring.predict(Candidate("a", engine_running=0, engine_waiting=0, kv_usage=0), 10, S)
    garbage = scoring.predict(Candidate("a", engine_waiting=math.nan, kv_usage=-1.0), 10, S)
    assert unknown == zero == garbage
    assert unknown.queue_ms == 0.0


def test_exact_ties_spread_across_seeds_and_are_stable_per_seed() -> None:
    cands = [Candidate(f"r{i}") for i in range(4)]
    picks = [best(cands, 100, seed=f"prefix-{n}".encode()) for n in range(200)]
    counts = {r: picks.count(r) for r in ("r0", "r1", "r2", "r3")}
    assert all(n >= 25 for n in counts.values()), counts  # 50 expected each
    for n in range(20):
        seed = f"prefix-{n}".encode()
        orders = {
            tuple(x.replica_id for x in scoring.rank(list(p), 100, S, seed=seed))
            for p in itertools.permutations(cands)
        }
        assert len(orders) == 1  # input order does not matter


def test_ties_only_break_exact_ties() -> None:
    cands = [Candidate(f"r{i}") for i in range(4)] + [Candidate("x", inflight_requests=1)]
    for n in range(50):
        assert scoring.rank(cands, 100, S, seed=bytes([n]))[-1].replica_id == "x"


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("inflight_requests", [0, 1, 5, 100]),
        ("inflight_prefill_tokens", [0, 1, 1000, 10**6]),
        ("engine_running", [None, 0.0, 3.0, 300.0]),
        ("engine_waiting", [None, 0.0, 1.0, 50.0]),
        ("kv_usage", [None, 0.0, 0.9, 0.95, 1.0, 1.5]),
    ],
)
def test_more_load_never_predicts_faster(field: str, values: list[float | None]) -> None:
    s = ScoringSettings(running_request_ms=1.0)
    ttfts = [scoring.predict(Candidate("a", 100, **{field: v}), 1000, s).predicted_ttft_ms for v in values]  # type: ignore[arg-type]
    assert ttfts == sorted(ttfts)
    assert ttfts[-1] > ttfts[0]


def test_longer_match_never_predicts_slower_and_longer_prompt_never_faster() -> None:
    by_match = [scoring.predict(Candidate("a", m), 1000, S).predicted_ttft_ms for m in range(0, 1200, 50)]
    assert by_match == sorted(by_match, reverse=True)
    by_prompt = [scoring.predict(Candidate("a", 100), p, S).predicted_ttft_ms for p in range(0, 2000, 50)]
    assert by_prompt == sorted(by_prompt)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefill_tokens_per_s": 0.0},
        {"prefill_tokens_per_s": math.inf},
        {"waiting_request_ms": -1.0},
        {"inflight_request_ms": math.nan},
        {"kv_usage_threshold": 1.0},
        {"speculative_ttl_s": 0.0},
        {"inflight_linger_s": -1.0},
    ],
)
def test_settings_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="scoring\\."):
        ScoringSettings(**kwargs)


def test_wire_score() -> None:
    assert scoring.score_value(0.0) == 1.0
    assert scoring.score_value(99.0) == pytest.approx(0.01)
    assert scoring.score_value(10.0) > scoring.score_value(11.0)
