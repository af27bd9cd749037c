"""``bench routing`` end to end on a tiny generated workload: the JSON array with exactly the
keys of issue #6, the table, flag errors, and the references of ``sim``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from inference_cache.routesim import bench, sim, trace


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def test_json_is_one_object_per_router_with_exactly_the_issue_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    rc = bench.run(
        args(
            "--workload", "multiturn", "--limit", "120", "--replicas", "3", "--json", str(out), "--seed", "2"
        )
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and [r["router"] for r in rows][-1] == "ours"
    assert len(rows) == 8
    for r in rows:
        assert tuple(r) == bench.KEYS
        assert r["workload"] == "multiturn" and r["replicas"] == 3 and r["seed"] == 2
        assert r["capacity_tokens"] == 300_000
        assert 0 <= r["hit_ratio"] <= 1
    rr = next(r for r in rows if r["router"] == "round_robin")
    assert rr["ratio_ttft_p90_to_round_robin"] == 1.0
    table = capsys.readouterr().out
    assert "| ours |" in table and "120 requests" in table


def test_a_subset_of_routers_and_a_rerun_give_the_same_quality_figures(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ("--workload", "shared_prefix", "--limit", "60", "--routers", "ours,round_robin")
    assert bench.run(args(*common, "--json", str(a))) == 0
    assert bench.run(args(*common, "--json", str(b))) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert [r["router"] for r in ra] == ["ours", "round_robin"]
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("decision")} == {
            k: v for k, v in y.items() if not k.startswith("decision")
        }


@pytest.mark.parametrize(
    "argv",
    [
        ("--routers", "nope"),
        ("--replicas", "0"),
        ("--trace", "/nonexistent/trace.jsonl"),
        ("--event-drop", "2"),
    ],
)
def test_bad_flags_exit_2(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    extra = () if "--trace" in argv else ("--workload", "rag", "--limit", "5")
    assert bench.run(args(*extra, *argv)) == 2
    assert "bench routing:" in capsys.readouterr().err


def test_references_bound_and_pool() -> None:
    w = trace.Workload(
        "t",
        16,
        (
            trace.Request(0.0, 33, 1, (1, 2)),
            trace.Request(1.0, 33, 1, (3, 4)),
            trace.Request(2.0, 33, 1, (1, 2)),
        ),
    )
    assert sim.infinite_hit_ratio(w) == pytest.approx(32 / 99)
    assert sim.pooled_lru_hit_ratio(w, 64) == pytest.approx(32 / 99)
    # Two blocks of room: (3, 4) pushed (1, 2) out.
    assert sim.pooled_lru_hit_ratio(w, 32) == 0.0
