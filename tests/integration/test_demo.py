"""``inference-cache demo`` end to end, in-process: fake engines, the server and a real Envoy
(``make envoy``), a small workload (templated requests with the warm-up on, chats, RAG)
routed cache-aware then round robin through one Envoy.

The Qwen tokenizer (``make tokenizer``, built before ``make test``) when present, else the
committed tiny one. Asserts the printed summary and the exit code, not timings.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

from inference_cache import demo

ROOT = Path(__file__).resolve().parents[2]
QWEN = ROOT / ".cache" / "tokenizers" / "qwen"
TINY = ROOT / "tests" / "data" / "tiny-tokenizer"


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_the_demo_routes_follow_ups_to_their_prefix_and_beats_round_robin() -> None:
    tokenizer, blocks = (QWEN, "96") if (QWEN / "tokenizer.json").is_file() else (TINY, "320")
    out, progress = io.StringIO(), io.StringIO()
    status = await demo.main(
        args(
            *("--tokenizer", str(tokenizer), "--num-gpu-blocks", blocks, "--engines", "3", "--seed", "3"),
            *("--conversations", "4", "--turns", "3", "--rag-requests", "4"),
            *("--templates", "2", "--template-requests", "2"),
        ),
        out,
        progress,
    )
    report = out.getvalue()
    assert status == 0, progress.getvalue() + report
    summary = {line[:22].strip(): line[22:].split() for line in report.splitlines() if line[:22].strip()}
    assert ["cache-aware", "round-robin"] in [line.split() for line in report.splitlines()]
    # 2 + 2 templated, 4 + 2 first requests, 4 * 2 + 2 follow-ups per run, all answered by the 3 engines
    for counts in (summary["requests per engine"][:3], summary["requests per engine"][3:]):
        assert [c.split(":")[0] for c in counts] == ["e1", "e2", "e3"]
        assert sum(int(c.split(":")[1]) for c in counts) == 20
    assert summary["prompt tokens"][0] == summary["prompt tokens"][1]  # the same prompts twice
    aware, baseline = (float(r.rstrip("%")) for r in summary["hit ratio"])
    assert aware > baseline
    assert summary["follow-ups on holder"][0] == "12/12"  # the templates' second requests too
    # with the warm-up on, each template's first request hit its pre-filled stable prefix
    assert summary["template first hits"][0] == "2/2"
    assert "warm-up on" in progress.getvalue()
    assert re.search(r"^PASS: cache-aware hit ratio", report, re.MULTILINE), report
    assert "envoy:   http://127.0.0.1:" in report
    assert "round-robin" in progress.getvalue() and "stopping" in progress.getvalue()


async def test_a_failure_is_reported_and_everything_stops(tmp_path: Path) -> None:
    """Envoy refuses to start (a binary that exits at once): exit 1 with the reason, and the
    engines and the server already started are stopped (the leak fixture checks the tasks)."""
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\necho 'no config for you' >&2\nexit 3\n")
    fake.chmod(0o755)
    out, progress = io.StringIO(), io.StringIO()
    status = await demo.main(
        args(*("--tokenizer", str(TINY), "--envoy", str(fake), "--engines", "2", "--conversations", "1")),
        out,
        progress,
    )
    assert status == 1
    assert "demo failed: envoy exited with 3" in progress.getvalue(), progress.getvalue()
    assert out.getvalue() == ""
