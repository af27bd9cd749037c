"""PNG charts of the benches' JSON for ``docs/benchmarks.md`` (matplotlib, optional).

Owner: the benchmarks (issue #6); called by :mod:`inference_cache.benchreport` for each
generated section that has a chart::

    rows of bench routing | live  --> chart_for --> Chart: TTFT p90 and hit ratio by router
    rows of bench extproc         --> chart_for --> Chart: latency vs prompt length
                                                    (Envoy alone vs + ext_proc, p50 and p99)
    Chart --> write (matplotlib Agg) --> docs/img/bench-<section>.png

Figures are medians over the repeats (rows with the same identity), with their spread
(min–max) as error bars. :func:`chart_for` is pure; only :func:`write` needs matplotlib, which
comes with the ``bench`` extra and is imported lazily: without it :func:`write` returns None
and the report keeps its tables. The PNG is deterministic for a given matplotlib: fixed size
and dpi, no ``Software`` (or any time) metadata.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]

SIZE_IN = (10.0, 4.0)
DPI = 100


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    x: tuple[float, ...]
    """Positions: category indexes (bars) or prompt lengths (lines)."""
    median: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    categories: tuple[str, ...] = ()
    """Bar charts: the x tick labels (``Series.x`` index them); empty for line charts."""
    xlabel: str = ""


@dataclass(frozen=True, slots=True)
class Chart:
    name: str
    """File stem (``bench-<section>``)."""
    title: str
    """The figure's title and the markdown image's alt text."""
    panels: tuple[Panel, ...]


def _stats(rows: Sequence[Row], key: str) -> tuple[float, float, float] | None:
    """(median, min, max) of ``key`` over ``rows`` (numbers only); None when there is none."""
    values = [
        float(r[key]) for r in rows if isinstance(r.get(key), int | float) and not isinstance(r[key], bool)
    ]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _group(rows: Sequence[Row], keys: Sequence[str]) -> dict[tuple[Any, ...], list[Row]]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return groups


def _bars(rows: Sequence[Row], key: str, title: str, ylabel: str, scale: float = 1.0) -> Panel | None:
    """One bar per (router, workload): routers on x, one series per workload."""
    routers = tuple(dict.fromkeys(str(r["router"]) for r in rows if "router" in r))
    series = []
    for (workload,), group in _group(rows, ("workload",)).items():
        points = [
            (i, s)
            for i, router in enumerate(routers)
            if (s := _stats([r for r in group if r.get("router") == router], key)) is not None
        ]
        if points:
            series.append(
                Series(
                    str(workload),
                    tuple(float(i) for i, _ in points),
                    tuple(s[0] * scale for _, s in points),
                    tuple(s[1] * scale for _, s in points),
                    tuple(s[2] * scale for _, s in points),
                )
            )
    return Panel(title, ylabel, tuple(series), routers) if series else None


def _latency(rows: Sequence[Row]) -> tuple[Panel, ...]:
    """One panel per (turn, concurrency); x = prompt size, lines = Envoy alone / + ext_proc."""
    groups = _group(rows, ("turn", "concurrency"))
    panels = []
    for (turn, concurrency), group in groups.items():
        sizes = sorted(
            {float(r["size_tokens"]) for r in group if isinstance(r.get("size_tokens"), int | float)}
        )
        series = []
        for label, key in (
            ("Envoy alone p50", "envoy_p50_ms"),
            ("Envoy alone p99", "envoy_p99_ms"),
            ("+ ext_proc p50", "extproc_p50_ms"),
            ("+ ext_proc p99", "extproc_p99_ms"),
        ):
            points = [
                (size, s)
                for size in sizes
                if (s := _stats([r for r in group if r.get("size_tokens") == size], key)) is not None
            ]
            if points:
                series.append(
                    Series(
                        label,
                        tuple(x for x, _ in points),
                        tuple(s[0] for _, s in points),
                        tuple(s[1] for _, s in points),
                        tuple(s[2] for _, s in points),
                    )
                )
        if series:
            several = len({c for _, c in groups}) > 1
            where = f"{turn} turn" + (f", concurrency {concurrency}" if several else "")
            panels.append(Panel(where, "latency (ms)", tuple(series), xlabel="prompt length (tokens)"))
    return tuple(panels)


def chart_for(section: str, rows: Sequence[Row]) -> Chart | None:
    """The chart of a generated section (None: the section has none, or no figures)."""
    panels: tuple[Panel | None, ...]
    if section == "routing":
        title = "Routing simulation: TTFT p90 and hit ratio by router"
        panels = (
            _bars(rows, "ttft_p90_s", "TTFT p90", "seconds (simulated)"),
            _bars(rows, "hit_ratio", "hit ratio", "cached / prompt tokens"),
        )
    elif section == "live":
        title = "Live routers on loopback: TTFT p90 and hit ratio by router"
        panels = (
            _bars(rows, "ttft_p90_ms", "TTFT p90", "ms"),
            _bars(rows, "hit_ratio", "hit ratio", "engines' cached / prompt tokens"),
        )
    elif section == "extproc":
        title = "ext_proc request path: latency vs prompt length"
        panels = _latency(rows)
    else:
        return None
    kept = tuple(p for p in panels if p is not None)
    return Chart(f"bench-{section}", title, kept) if kept else None


# -- drawing ------------------------------------------------------------------------------------


def _spread(s: Series) -> list[list[float]] | None:
    """Error bars (median to min, median to max); None when every repeat agreed."""
    below = [m - lo for m, lo in zip(s.median, s.low, strict=True)]
    above = [hi - m for m, hi in zip(s.median, s.high, strict=True)]
    return [below, above] if any(below) or any(above) else None


def _draw_panel(ax: Any, panel: Panel) -> None:
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    ax.grid(axis="y", alpha=0.3)
    if panel.categories:
        width = 0.8 / len(panel.series)
        for k, s in enumerate(panel.series):
            xs = [x - 0.4 + width * (k + 0.5) for x in s.x]
            ax.bar(xs, s.median, width, yerr=_spread(s), capsize=2, label=s.label)
        ax.set_xticks(range(len(panel.categories)), panel.categories, rotation=30, ha="right")
    else:
        for k, s in enumerate(panel.series):
            style = {"color": f"C{k // 2}", "linestyle": "-" if k % 2 == 0 else "--"}
            ax.errorbar(s.x, s.median, yerr=_spread(s), marker="o", capsize=2, label=s.label, **style)
        sizes = sorted({x for s in panel.series for x in s.x})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
        ax.set_xlabel(panel.xlabel)
        ax.set_ylim(bottom=0)
    if len(panel.series) > 1:
        ax.legend(fontsize="small")


def write(charts: Sequence[Chart], directory: Path) -> list[Path] | None:
    """Draw ``charts`` into ``directory/<name>.png``; -> the files, or None without matplotlib."""
    try:
        figure_mod = importlib.import_module("matplotlib.figure")
        agg = importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for chart in charts:
        fig = figure_mod.Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
        agg.FigureCanvasAgg(fig)
        fig.suptitle(chart.title)
        for ax, panel in zip(fig.subplots(1, len(chart.panels), squeeze=False)[0], chart.panels, strict=True):
            _draw_panel(ax, panel)
        path = directory / f"{chart.name}.png"
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
        out.append(path)
    return out
