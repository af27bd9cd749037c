"""``inference_cache.inferenceperf``: the config it writes, its per-request report parsed from a
recorded run (inference-perf 0.7.0 against one fake engine: 2 groups x 3 questions, 46-token
prompts, block size 16), and the subprocess seam driven by a stand-in executable (the real
tool runs only in ``make bench``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from inference_cache import inferenceperf

REPORT = Path(__file__).resolve().parent / "data" / "inference-perf" / inferenceperf.PER_REQUEST


def load(tmp_path: Path) -> inferenceperf.Load:
    return inferenceperf.Load(
        url="http://127.0.0.1:1",
        model="bench-model",
        tokenizer=tmp_path / "tok",
        groups=2,
        questions=3,
        prefix_tokens=40,
        question_tokens=6,
        max_tokens=3,
        concurrency=2,
        seed=7,
        report_dir=tmp_path / "report",
    )


def stand_in(tmp_path: Path, rc: int = 0) -> Path:
    """An executable that answers like inference-perf: the recorded report where the config says."""
    exe = tmp_path / "inference-perf"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys, yaml\n"
        "from pathlib import Path\n"
        "cfg = yaml.safe_load(Path(sys.argv[sys.argv.index('--config_file') + 1]).read_text())\n"
        "out = Path(cfg['storage']['local_storage']['path'])\n"
        "out.mkdir(parents=True)\n"
        f"shutil.copy({str(REPORT)!r}, out / {inferenceperf.PER_REQUEST!r})\n"
        f"print('stand-in done'); sys.exit({rc})\n"
    )
    exe.chmod(0o755)
    return exe


def test_config_is_a_shared_prefix_run_with_per_request_metrics(tmp_path: Path) -> None:
    cfg = yaml.safe_load(yaml.safe_dump(inferenceperf.config(load(tmp_path))))
    assert cfg["data"]["type"] == "shared_prefix"
    assert cfg["data"]["shared_prefix"] == {
        "num_groups": 2,
        "num_prompts_per_group": 3,
        "system_prompt_len": 40,
        "question_len": 6,
        "output_len": 3,
        "seed": 7,
    }
    assert cfg["load"]["type"] == "concurrent"
    assert cfg["load"]["stages"] == [{"num_requests": 6, "concurrency_level": 2}]
    assert cfg["api"] == {"type": "completion", "streaming": True}
    assert cfg["server"]["base_url"] == "http://127.0.0.1:1"
    assert cfg["tokenizer"]["pretrained_model_name_or_path"] == str(tmp_path / "tok")
    lifecycle = cfg["report"]["request_lifecycle"]
    assert lifecycle["per_request"] is True and lifecycle["per_request_fields"]["computed_metrics"] is True
    assert cfg["storage"]["local_storage"]["path"] == str(tmp_path / "report")


def test_parse_the_recorded_report() -> None:
    records = inferenceperf.parse_requests(json.loads(REPORT.read_text()))
    assert len(records) == 6
    assert [r.start for r in records] == sorted(r.start for r in records)
    assert {r.prompt_tokens for r in records} == {46}
    assert [r.cached_tokens for r in records] == [0, 32, 0, 32, 32, 32]  # the engine's usage
    assert all(r.error is None for r in records)
    assert all(0 < r.ttft_s < r.latency_s for r in records)
    assert all(json.loads(r.body)["prompt"] for r in records)


def test_parse_an_error_entry_and_refuse_other_json() -> None:
    entry = json.loads(REPORT.read_text())[0]
    entry |= {"error": {"error_type": "ClientError", "error_msg": "boom"}, "computed_metrics": None}
    entry["info"] = None
    (record,) = inferenceperf.parse_requests([entry])
    assert record.error == "ClientError: boom"
    assert record.prompt_tokens == 0 and math.isnan(record.ttft_s)
    with pytest.raises(inferenceperf.InferencePerfError):
        inferenceperf.parse_requests({"not": "a list"})
    with pytest.raises(inferenceperf.InferencePerfError):
        inferenceperf.parse_requests([{"start_time": 1.0}])


async def test_run_writes_the_config_and_reads_the_report(tmp_path: Path) -> None:
    the_load = load(tmp_path)
    config_file = tmp_path / "ip.yaml"
    records = await inferenceperf.run(the_load, config_file, tmp_path / "ip.log", stand_in(tmp_path))
    assert yaml.safe_load(config_file.read_text()) == inferenceperf.config(the_load)
    assert len(records) == 6
    assert "stand-in done" in (tmp_path / "ip.log").read_text()


async def test_run_reports_a_failed_run(tmp_path: Path) -> None:
    with pytest.raises(inferenceperf.InferencePerfError, match="exited 3"):
        await inferenceperf.run(
            load(tmp_path), tmp_path / "ip.yaml", tmp_path / "ip.log", stand_in(tmp_path, rc=3)
        )
    assert not inferenceperf.installed(tmp_path / "absent")
