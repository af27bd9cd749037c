"""The pure ranking factors with the seed inventory's worked numbers (§4.6, §7.2 d-f)."""

from __future__ import annotations

import hashlib

import pytest

from inference_cache.index import ranking, types


def test_freshness_linear_decay_and_clamps() -> None:
    assert ranking.freshness(0, 100) == 1.0
    assert ranking.freshness(-5, 100) == 1.0
    assert ranking.freshness(40, 100) == pytest.approx(0.6)
    assert ranking.freshness(100, 100) == 0.0
    assert ranking.freshness(1, 0) == 0.0


def test_pressure_example_100_tokens_busy_vs_50_tokens_idle() -> None:
    busy = 100 * 1.0 * ranking.pressure_factor(0.9, 1.0)
    idle = 50 * 1.0 * ranking.pressure_factor(0.0, 1.0)
    assert busy == pytest.approx(10)
    assert idle == pytest.approx(50)
    assert ranking.pressure_factor(2.0, 1.0) == 0.0


def test_tight_slo_prefers_fresh() -> None:
    coef = ranking.slo_coef(50, 200, 1.0)
    assert coef == 1.0
    assert 100 * 0.6 * (1 + 0.6 * coef) == pytest.approx(96)
    assert 50 * 1.0 * (1 + 1.0 * coef) == pytest.approx(100)
    assert ranking.slo_coef(0, 200, 1.0) == 0.0
    assert ranking.slo_coef(200, 200, 1.0) == 0.0


def test_distinguishing_power_256_128_64() -> None:
    dps = ranking.chain_dp_factors([256, 128, 64], 3)
    assert dps == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert [m * d for m, d in zip([256, 128, 64], dps, strict=True)] == pytest.approx(
        [170.67, 42.67, 0], abs=0.01
    )
    assert ranking.distinguishing_power(1, 1) == 1.0
    assert ranking.distinguishing_power(-1, 5) == 1.0
    assert ranking.chain_dp_factors([64, 64], 4) == pytest.approx([0.5, 0.5])


def test_effective_prefix_tokens_chain_sum_takes_precedence() -> None:
    s = types.Scope("t", "m", "vllm")
    assert (
        ranking.effective_prefix_tokens(types.LookupRequest(s, token_count=500, block_token_counts=[16, 16]))
        == 32
    )
    assert ranking.effective_prefix_tokens(types.LookupRequest(s, token_count=500)) == 500


def test_affinity_seed_and_pick() -> None:
    seed = ranking.affinity_seed([b"ab", b"c"], b"ignored")
    assert seed == b"\x00\x00\x00\x02ab\x00\x00\x00\x01c"
    assert ranking.affinity_seed([], b"xyz") == b"xyz"
    replicas = ["r2", "r0", "r1"]
    n = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big")
    assert ranking.affinity_pick(seed, replicas) == sorted(replicas)[n % 3]
    assert ranking.affinity_pick(seed, list(reversed(replicas))) == ranking.affinity_pick(seed, replicas)
