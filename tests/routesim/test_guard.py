"""The CI quality guard of issue #6: on a fixed slice of the Mooncake conversation trace
(``tests/data/mooncake-slice``: its first 2,000 requests) at the headline configuration
(8 replicas x 300,000 tokens, seed 0), ``ours`` must be as fast and keep as many prefixes as
the peers. Quality only: decision wall times are reported by the bench, never asserted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inference_cache.routesim import bench, sim, trace
from inference_cache.routesim.engine import EngineSettings

SLICE = Path(__file__).resolve().parents[1] / "data" / "mooncake-slice" / "conversation_trace_first2000.jsonl"


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, Any]]:
    workload = trace.load_mooncake(SLICE)
    assert len(workload.requests) == 2000
    out, _results = bench.run_all(
        workload, replicas=8, engine=EngineSettings(capacity_tokens=300_000), signals=sim.Signals(), seed=0
    )
    return {r["router"]: r for r in out}


def test_every_router_ran(rows: dict[str, dict[str, Any]]) -> None:
    assert set(rows) == {
        "random",
        "round_robin",
        "least_load",
        "gie_approx",
        "dynamo_w1",
        "dynamo_w4",
        "llmd_precise",
        "ours",
    }


def test_ours_ttft_p90_within_5_percent_of_the_best_other(rows: dict[str, dict[str, Any]]) -> None:
    best = min(r["ttft_p90_s"] for name, r in rows.items() if name != "ours")
    assert rows["ours"]["ttft_p90_s"] <= 1.05 * best


def test_ours_hit_ratio_within_10_percent_of_the_best_other(rows: dict[str, dict[str, Any]]) -> None:
    best = max(r["hit_ratio"] for name, r in rows.items() if name != "ours")
    assert rows["ours"]["hit_ratio"] >= 0.9 * best


@pytest.mark.parametrize("cache_blind", ["round_robin", "random", "least_load"])
def test_ours_hit_ratio_at_least_the_cache_blind_routers(
    rows: dict[str, dict[str, Any]], cache_blind: str
) -> None:
    assert rows["ours"]["hit_ratio"] >= rows[cache_blind]["hit_ratio"]
