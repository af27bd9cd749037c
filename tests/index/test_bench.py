"""``bench index`` plumbing at toy sizes (figures are never asserted, only their shape)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from inference_cache.index import bench


def test_measure_reports_every_chain_length() -> None:
    rows = bench.measure(2048, lookups=5, seed=3)
    assert [r["chain_blocks"] for r in rows] == [64, 256]
    assert all(r["entries"] >= 2048 for r in rows)


def test_run_writes_flat_json_with_unit_suffixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "b.json"
    args = parser.parse_args(["--sizes", "1024", "--lookups", "3", "--json", str(out)])
    assert bench.run(args) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 2
    for row in rows:
        for key in row:
            assert key in ("entries", "chain_blocks") or key.endswith(("_s", "_us", "_per_s", "_bytes")), key
    assert "lookup_p99_us" in capsys.readouterr().out
