"""``inference_cache.benchcharts``: the charts' figures are medians with their spread, the PNGs
are valid and byte-identical on a re-run, and nothing is drawn without matplotlib."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from inference_cache import benchcharts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ROUTING = [
    {"router": "round_robin", "workload": "mooncake", "seed": s, "ttft_p90_s": t, "hit_ratio": 0.05}
    for s, t in ((0, 5.0), (1, 7.0), (2, 6.0))
] + [{"router": "ours", "workload": "mooncake", "seed": 0, "ttft_p90_s": 2.5, "hit_ratio": 0.1}]
EXTPROC = [
    {"size_tokens": size, "turn": turn, "concurrency": 1, "envoy_p50_ms": 0.7, "envoy_p99_ms": 0.9}
    | {"extproc_p50_ms": size / 512, "extproc_p99_ms": size / 256}
    for turn in ("first", "follow-up")
    for size in (8192, 1024)
]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_routing_chart_has_medians_and_spread_by_router() -> None:
    chart = benchcharts.chart_for("routing", ROUTING)
    assert chart is not None
    assert chart.name == "bench-routing"
    ttft, hit = chart.panels
    assert ttft.categories == ("round_robin", "ours")
    (series,) = ttft.series
    assert series.label == "mooncake"
    assert (series.x, series.median, series.low, series.high) == (
        (0.0, 1.0),
        (6.0, 2.5),
        (5.0, 2.5),
        (7.0, 2.5),
    )
    assert hit.series[0].median == (0.05, 0.1)


def test_live_chart_has_one_series_per_workload() -> None:
    rows = [
        {"router": r, "workload": w, "ttft_p90_ms": 10.0, "hit_ratio": 0.8}
        for w in ("shared_prefix", "multiturn")
        for r in ("ours", "round_robin")
    ]
    chart = benchcharts.chart_for("live", rows)
    assert chart is not None
    assert [s.label for s in chart.panels[0].series] == ["shared_prefix", "multiturn"]


def test_extproc_chart_is_latency_by_prompt_length_per_turn() -> None:
    chart = benchcharts.chart_for("extproc", EXTPROC)
    assert chart is not None
    assert [p.title for p in chart.panels] == ["first turn", "follow-up turn"]
    series = {s.label: s for s in chart.panels[0].series}
    assert list(series) == ["Envoy alone p50", "Envoy alone p99", "+ ext_proc p50", "+ ext_proc p99"]
    assert series["+ ext_proc p99"].x == (1024.0, 8192.0)
    assert series["+ ext_proc p99"].median == (4.0, 32.0)


def test_no_chart_for_other_sections_or_rows_without_figures() -> None:
    assert benchcharts.chart_for("index", [{"entries": 1, "lookup_p50_us": 2.0}]) is None
    assert benchcharts.chart_for("routing", [{"router": "ours", "workload": "w"}]) is None


def test_write_draws_valid_deterministic_pngs(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (a test dependency: never skipped)

    charts = [
        c for c in (benchcharts.chart_for("routing", ROUTING), benchcharts.chart_for("extproc", EXTPROC)) if c
    ]
    written = benchcharts.write(charts, tmp_path / "img")
    assert written == [tmp_path / "img" / "bench-routing.png", tmp_path / "img" / "bench-extproc.png"]
    expected = (int(benchcharts.SIZE_IN[0] * benchcharts.DPI), int(benchcharts.SIZE_IN[1] * benchcharts.DPI))
    first = [p.read_bytes() for p in written]
    for path in written:
        assert png_size(path) == expected
        assert b"Software" not in path.read_bytes()
    assert benchcharts.write(charts, tmp_path / "img") == written
    assert [p.read_bytes() for p in written] == first


def test_write_without_matplotlib_draws_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    chart = benchcharts.chart_for("routing", ROUTING)
    assert chart is not None
    assert benchcharts.write([chart], tmp_path / "img") is None
    assert not (tmp_path / "img").exists()
