"""Rewrite the generated sections of ``docs/benchmarks.md`` from the benches' JSON.

Owner: the benchmarks (issue #6); ``make bench`` and ``make bench-full`` call it last::

    bench routing|live|extproc|index --json OUT (one or more runs each)
        --> python -m inference_cache.benchreport --result NAME COMMAND OUT [OUT ...] ...
        --> docs/benchmarks.md: the text between ``<!-- BEGIN GENERATED: NAME -->`` and
            ``<!-- END GENERATED: NAME -->`` replaced (sections without markers are appended
            at the end with their markers); everything outside the markers is left alone.

Each JSON file is a top-level array of row objects (the convention of every bench). Rows with
the same identity (the bench's key columns, :data:`IDENTITY`) over all the given files (and
``repeat`` values) are repeats: the table shows each number's median and, with more than one
repeat, its spread ``median (min–max)``. Columns equal in every row move to a "same for every
row" line under the table. A ``machine`` section records where and when the figures were
taken. Sections with a chart (:mod:`inference_cache.benchcharts`: routing, live, extproc) link
``img/bench-<section>.png`` beside the document, drawn when matplotlib (the ``bench`` extra) is
installed; without it the tables are still written and the sections say the charts were
skipped (an earlier PNG is left as it was, not linked).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from inference_cache import benchcharts, livebench

DOC = Path("docs/benchmarks.md")
IMG = "img"
"""The charts' folder, relative to the document."""
SKIPPED = "Chart skipped: matplotlib is not installed (`pip install -e '.[bench]'`; `make bench` does)."
BEGIN = "<!-- BEGIN GENERATED: {} -->"
END = "<!-- END GENERATED: {} -->"
#: Per bench: the columns that name a row (the others are measurements).
IDENTITY: dict[str, tuple[str, ...]] = {
    "routing": ("router", "workload", "replicas", "capacity_tokens"),
    "live": ("router", "workload"),
    "extproc": ("size_tokens", "turn", "matching", "concurrency"),
    "index": ("entries", "chain_blocks"),
}
#: Columns that only number repeats (dropped from tables).
REPEAT_KEYS = ("repeat", "seed")
#: Per bench: long descriptive columns listed per workload under the table instead.
BY_WORKLOAD: dict[str, tuple[str, ...]] = {"live": ("load_generator", "client")}
TITLES = {
    "machine": "Machine",
    "routing": "Routing simulation (`bench routing`)",
    "live": "Live routers on loopback (`bench live`)",
    "extproc": "ext_proc request path (`bench extproc`)",
    "index": "Index (`bench index`)",
}

Row = Mapping[str, Any]


class ReportError(Exception):
    """A result file is missing or not a bench's JSON."""


# -- pure ---------------------------------------------------------------------------------------


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the generated section ``name`` set to ``body`` (appended with its
    markers when absent); nothing outside the markers changes."""
    begin, end = BEGIN.format(name), END.format(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    start = text.find(begin)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    stop = text.find(end, start)
    if stop < 0:
        raise ReportError(f"{begin} has no {end}")
    return text[:start] + block + text[stop + len(end) :]


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: float) -> str:
    """Integers as such, large numbers without decimals, small ones to 4 significant digits."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def aggregate(rows: Sequence[Row], identity: Sequence[str]) -> list[dict[str, str]]:
    """One row per identity (first-seen order): numbers as their median, with the spread
    ``(min–max)`` when repeats differ; other values as in the first repeat."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in identity), []).append(row)
    out: list[dict[str, str]] = []
    for repeats in groups.values():
        columns = [c for c in repeats[0] if c not in REPEAT_KEYS]
        merged: dict[str, str] = {}
        for column in columns:
            values = [r.get(column) for r in repeats]
            numbers = [v for v in values if _is_number(v)]
            if column in identity or len(numbers) != len(values):
                merged[column] = "" if values[0] is None else str(values[0])
                continue
            median = statistics.median(numbers)
            lo, hi = min(numbers), max(numbers)
            merged[column] = _fmt(median) if lo == hi else f"{_fmt(median)} ({_fmt(lo)}–{_fmt(hi)})"
        merged["repeats"] = str(len(repeats))
        out.append(merged)
    return out


def table(rows: Sequence[Mapping[str, str]], identity: Sequence[str]) -> str:
    """A markdown table; columns equal in every row (and not identity) become one line below."""
    if not rows:
        return "_no rows_"
    columns = list(dict.fromkeys(c for r in rows for c in r))
    constant = [
        c for c in columns if c not in identity and len(rows) > 1 and len({r.get(c, "") for r in rows}) == 1
    ]
    shown = [c for c in columns if c not in constant]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(r.get(c, "") for c in shown) + " |" for r in rows]
    if constant:
        lines += ["", "Same for every row: " + ", ".join(f"{c} = {rows[0][c]}" for c in constant) + "."]
    return "\n".join(lines)


def chart_link(chart: benchcharts.Chart, drawn: bool) -> str:
    """The markdown under a section's table: the image, or why it is missing."""
    return f"![{chart.title}]({IMG}/{chart.name}.png)" if drawn else SKIPPED


def bench_section(name: str, command: str, rows: Sequence[Row], files: int, chart: str = "") -> str:
    identity = IDENTITY.get(name, ())
    moved = BY_WORKLOAD.get(name, ())
    merged = [{k: v for k, v in r.items() if k not in moved} for r in aggregate(rows, identity)]
    repeats = max((int(r["repeats"]) for r in merged), default=0)
    runs = f"{files} JSON file{'s' if files != 1 else ''}, {repeats} repeat{'s' if repeats != 1 else ''}" + (
        "; medians with (min–max) over the repeats" if repeats > 1 else ""
    )
    return "\n".join(
        [
            f"### {TITLES.get(name, name)}",
            "",
            f"Generated by `make bench`/`make bench-full` ({runs}). Command:",
            "",
            "```",
            command,
            "```",
            "",
            table(merged, identity),
            *(["", chart] if chart else []),
            *by_workload(rows, moved),
            *_extras(name, rows),
        ]
    )


def by_workload(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    """Lines naming ``columns``' values per workload (``bench live``: which client ran)."""
    seen: dict[str, dict[str, str]] = {}
    for row in rows:
        values = {c: str(row[c]) for c in columns if row.get(c) is not None}
        if values:
            seen.setdefault(str(row.get("workload", "")), values)
    if not seen:
        return []
    return ["", *(f"- {w}: " + "; ".join(f"{c}: {v}" for c, v in vs.items()) for w, vs in seen.items())]


def _extras(name: str, rows: Sequence[Row]) -> list[str]:
    """Bench-specific text under the table (``bench live``: its notes and targets)."""
    if name != "live":
        return []
    return [
        "",
        livebench.NOTES,
        "",
        "Targets of issue #6 (medians; stated, not asserted):",
        "",
        *(f"- {line}" for line in livebench.targets(livebench.medians(rows))),
    ]


def machine_section(facts: Mapping[str, str], profile: str, charts: str) -> str:
    lines = [
        "## Generated by `make bench`",
        "",
        "The blocks between GENERATED markers from here on are rewritten by "
        "`python -m inference_cache.benchreport`; edit the hand-written sections above instead.",
        "",
        f"### {TITLES['machine']}",
        "",
        f"Profile: `{profile}`.",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines += [
        "",
        f"**Charts** (TTFT p90 and hit ratio by router; latency vs prompt length): {charts}. "
        "Drawn by `inference_cache.benchcharts` with matplotlib (the `bench` extra, which "
        "`make bench` installs) at a fixed size with no time or software metadata, so the same "
        "JSON gives the same PNG bytes; without matplotlib the tables are still written.",
        "",
        "**Load generator** (`bench live`): our aiohttp client, except for the shared-prefix "
        "workload when inference-perf is installed (`make peers`, part of `make bench`, puts it "
        "in `.tools/inference-perf` with a Python 3.12): then its `shared_prefix` data generator "
        "sends the same groups, questions and sizes. It runs only in `make bench`/`make bench-full` "
        "(the tests parse a recorded report); the live section says which ran per workload.",
    ]
    return "\n".join(lines)


# -- I/O ----------------------------------------------------------------------------------------


def _first_line(path: str, prefix: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), "?")
    except OSError:
        return "?"


def machine_facts() -> dict[str, str]:
    """Where the figures were taken: CPU, cores, memory, OS, Python, commit, date."""
    mem = _first_line("/proc/meminfo", "MemTotal")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "CPU": _first_line("/proc/cpuinfo", "model name"),
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": mem,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_rows(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ReportError(f"{path}: not a JSON array of objects")
    return data


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--doc", type=Path, default=DOC, help=f"the document rewritten (default {DOC})")
    p.add_argument("--profile", default="quick", help="named in the machine section (quick, full)")
    p.add_argument(
        "--result",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME COMMAND JSON",
        help="a section: its name (routing, live, extproc, index), the exact command, its JSON file(s)",
    )


def _charts_note(drawn: Sequence[Path] | None) -> str:
    if drawn is None:
        return "skipped, matplotlib is not installed"
    version = importlib.metadata.version("matplotlib")
    return f"{len(drawn)} PNG file{'s' if len(drawn) != 1 else ''} in `{IMG}/`, matplotlib {version} (Agg)"


def run(args: argparse.Namespace) -> int:
    try:
        text = args.doc.read_text(encoding="utf-8")
        sections: list[tuple[str, str, list[Row], int]] = []
        for result in args.result:
            if len(result) < 3:
                raise ReportError(f"--result {' '.join(result)}: expected NAME COMMAND JSON [JSON ...]")
            name, command, *files = result
            sections.append((name, command, [row for f in files for row in load_rows(Path(f))], len(files)))
        charts = {name: c for name, _, rows, _ in sections if (c := benchcharts.chart_for(name, rows))}
        drawn = benchcharts.write(list(charts.values()), args.doc.parent / IMG)
        text = replace_section(
            text, "machine", machine_section(machine_facts(), args.profile, _charts_note(drawn))
        )
        for name, command, rows, files in sections:
            chart = chart_link(charts[name], drawn is not None) if name in charts else ""
            text = replace_section(text, name, bench_section(name, command, rows, files, chart))
    except (OSError, ReportError) as exc:
        print(f"benchreport: {exc}", file=sys.stderr)
        return 1
    args.doc.write_text(text, encoding="utf-8")
    print(f"rewrote the generated sections of {args.doc}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference_cache.benchreport", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
