"""``inference_cache.benchreport``: generated sections replaced between their markers only,
repeats folded into medians with their spread, constant columns moved under the table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from inference_cache import benchreport

HAND = "# Benchmarks\n\nHand-written intro.\n\n## Index\n\nHand-written analysis.\n"


def test_replace_section_appends_missing_markers_and_keeps_the_text() -> None:
    out = benchreport.replace_section(HAND, "live", "table v1")
    assert out.startswith(HAND.rstrip("\n"))
    assert out.endswith("<!-- BEGIN GENERATED: live -->\ntable v1\n<!-- END GENERATED: live -->\n")


def test_replace_section_rewrites_only_between_markers() -> None:
    doc = benchreport.replace_section(HAND, "live", "table v1") + "\n## After\n\nMore hand-written text.\n"
    out = benchreport.replace_section(doc, "live", "table v2")
    assert "table v1" not in out
    assert out == doc.replace("table v1", "table v2")


def test_replace_section_without_end_marker_is_an_error() -> None:
    with pytest.raises(benchreport.ReportError):
        benchreport.replace_section("<!-- BEGIN GENERATED: live -->\nx\n", "live", "y")


def test_aggregate_medians_with_spread_per_identity() -> None:
    rows = [
        {
            "router": "ours",
            "workload": "w",
            "repeat": 0,
            "hit_ratio": 0.5,
            "ttft_p90_ms": 10.0,
            "client": "c",
        },
        {
            "router": "ours",
            "workload": "w",
            "repeat": 1,
            "hit_ratio": 0.5,
            "ttft_p90_ms": 30.0,
            "client": "c",
        },
        {
            "router": "ours",
            "workload": "w",
            "repeat": 2,
            "hit_ratio": 0.5,
            "ttft_p90_ms": 12.0,
            "client": "c",
        },
        {
            "router": "rr",
            "workload": "w",
            "repeat": 0,
            "hit_ratio": 0.25,
            "ttft_p90_ms": 14150,
            "client": "c",
        },
    ]
    merged = benchreport.aggregate(rows, ("router", "workload"))
    assert merged == [
        {
            "router": "ours",
            "workload": "w",
            "hit_ratio": "0.5",
            "ttft_p90_ms": "12 (10–30)",
            "client": "c",
            "repeats": "3",
        },
        {
            "router": "rr",
            "workload": "w",
            "hit_ratio": "0.25",
            "ttft_p90_ms": "14150",
            "client": "c",
            "repeats": "1",
        },
    ]


def test_table_moves_constant_columns_below() -> None:
    rows = [{"router": "a", "hit": "1", "client": "c"}, {"router": "b", "hit": "2", "client": "c"}]
    text = benchreport.table(rows, ("router",))
    assert text.splitlines()[0] == "| router | hit |"
    assert text.splitlines()[-1] == "Same for every row: client = c."


def test_run_rewrites_the_doc(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(HAND)
    result = tmp_path / "routing.json"
    result.write_text(json.dumps([{"router": "ours", "workload": "multiturn", "hit_ratio": 0.46}]))
    args = argparse.Namespace(
        doc=doc,
        profile="quick",
        result=[["routing", "inference-cache bench routing --json routing.json", str(result)]],
    )
    assert benchreport.run(args) == 0
    text = doc.read_text()
    assert text.startswith(HAND.rstrip("\n"))
    assert "<!-- BEGIN GENERATED: machine -->" in text
    assert "inference-cache bench routing --json routing.json" in text
    assert "| ours | multiturn | 0.46 | 1 |" in text  # identity, hit_ratio, repeats
    # a second run replaces, never duplicates
    assert benchreport.run(args) == 0
    assert doc.read_text().count("<!-- BEGIN GENERATED: routing -->") == 1


def test_run_refuses_a_file_that_is_not_bench_json(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(HAND)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "an array"}')
    args = argparse.Namespace(doc=doc, profile="quick", result=[["live", "cmd", str(bad)]])
    assert benchreport.run(args) == 1
    assert doc.read_text() == HAND


def _routing_args(tmp_path: Path) -> argparse.Namespace:
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text(HAND)
    result = tmp_path / "routing.json"
    rows = [
        {"router": r, "workload": "mooncake", "hit_ratio": h, "ttft_p90_s": t}
        for r, h, t in (("rr", 0.05, 5.6), ("ours", 0.1, 2.8))
    ]
    result.write_text(json.dumps(rows))
    return argparse.Namespace(doc=doc, profile="quick", result=[["routing", "cmd", str(result)]])


def test_run_draws_and_links_the_charts(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (a test dependency: never skipped)

    args = _routing_args(tmp_path)
    assert benchreport.run(args) == 0
    png = tmp_path / "docs" / "img" / "bench-routing.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = args.doc.read_text()
    assert "](img/bench-routing.png)" in text
    assert "1 PNG file in `img/`, matplotlib" in text


def test_run_without_matplotlib_writes_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = _routing_args(tmp_path)
    assert benchreport.run(args) == 0
    text = args.doc.read_text()
    assert "| ours | mooncake | 0.1 | 2.8 |" in text
    assert benchreport.SKIPPED in text
    assert "skipped, matplotlib is not installed" in text
    assert ".png" not in text
    assert not (tmp_path / "docs" / "img").exists()


def test_live_section_names_the_load_generator_per_workload() -> None:
    figures = dict.fromkeys(
        ("hit_ratio", "ideal_hit_ratio", "hit_over_ideal", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms"), 1.0
    ) | {"ttft_p99_ms": 1.0, "latency_p50_ms": 1.0, "imbalance_max_mean": None, "errors": 0}
    rows = [
        {
            "router": "ours",
            "workload": "shared_prefix",
            **figures,
            "load_generator": "inference-perf 0.7.0",
            "client": "pool",
        },
        {
            "router": "ours",
            "workload": "multiturn",
            **figures,
            "load_generator": "own (aiohttp)",
            "client": "fresh",
        },
    ]
    text = benchreport.bench_section("live", "cmd", rows, 1)
    header = next(line for line in text.splitlines() if line.startswith("| router"))
    assert "load_generator" not in header and "client" not in header
    assert "- shared_prefix: load_generator: inference-perf 0.7.0; client: pool" in text
    assert "- multiturn: load_generator: own (aiohttp); client: fresh" in text
