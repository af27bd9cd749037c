"""``inference_cache.livebench``: the pure parts (ideal hits, workloads, peer command lines,
summaries) and one smoke run of the real processes (fake engines, our server behind Envoy,
Envoy round robin; the peers are not installed by ``make test``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from inference_cache import cli, inferenceperf, livebench
from inference_cache.extproc import openai

from . import test_inferenceperf

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-tokenizer"


def test_ideal_cached_counts_full_blocks_shared_with_earlier_prompts() -> None:
    a = list(range(40))  # 2 full blocks of 16 + 8
    b = list(range(32)) + [99] * 8  # shares a's 2 blocks
    c = list(range(16)) + [7] * 17  # shares 1 block
    d = list(range(32))  # a hit is capped one block short: (32 - 1) // 16 = 1 block
    assert livebench.ideal_cached([a, b, c, d, a], 16) == [0, 32, 16, 16, 32]


def test_sessions_shapes() -> None:
    shape = livebench.WorkloadShape(groups=3, questions=2, prefix_words=20, sessions=2, turns=3)
    shared = livebench.sessions("shared_prefix", shape, 0)
    assert len(shared) == 6 and all(len(s) == 1 for s in shared)
    assert len({s[0][0]["content"] for s in shared}) == 3  # 3 distinct system prompts
    multi = livebench.sessions("multiturn", shape, 0)
    assert [len(s) for s in multi] == [3, 3]
    assert livebench.sessions("multiturn", shape, 0) == multi  # seeded


def test_peer_commands(tmp_path: Path) -> None:
    for peer, script in (("sglang-router", "sglang-router"), ("vllm-router", "vllm-router")):
        exe = tmp_path / peer / "bin" / script
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    settings = livebench.Settings(engine=livebench.EngineSettings(tokenizer=TINY), peers_dir=tmp_path)
    engines = [livebench.Engine("http://127.0.0.1:1", "127.0.0.1:1", "tcp://*:5", "tcp://127.0.0.1:5")]
    cmd, env = livebench.peer_command(settings, "vllm_kv_aware", engines, 9, 10)
    assert cmd[cmd.index("--policy") + 1] == "kv_aware"
    assert cmd[cmd.index("--kv-event-source") + 1] == "http://127.0.0.1:1=tcp://127.0.0.1:5"
    assert env == {"VLLM_ROUTER_TOKENIZER": str(TINY)}
    cmd, _ = livebench.peer_command(settings, "sglang_cache_aware", engines, 9, 10)
    assert cmd[1] == "launch" and cmd[cmd.index("--policy") + 1] == "cache_aware"
    with pytest.raises(FileNotFoundError):
        livebench.peer_command(
            livebench.Settings(engine=settings.engine, peers_dir=tmp_path / "none"),
            "vllm_cache_aware",
            engines,
            9,
            10,
        )


def test_medians_and_ratio_to_the_reference() -> None:
    def row(router: str, repeat: int, p90: float) -> dict[str, object]:
        keys = (
            "hit_ratio",
            "ideal_hit_ratio",
            "hit_over_ideal",
            "ttft_mean_ms",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "latency_p50_ms",
        )
        return {"router": router, "workload": "w", "repeat": repeat, "errors": 0, "ttft_p90_ms": p90,
                "imbalance_max_mean": None, **dict.fromkeys(keys, 1.0)}  # fmt: skip

    rows = [
        row("ours", 0, 10.0),
        row("ours", 1, 30.0),
        row("ours", 2, 20.0),
        row(livebench.REFERENCE_ROUTER, 0, 40.0),
    ]
    out = {r["router"]: r for r in livebench.medians(rows)}
    assert out["ours"]["ttft_p90_ms"] == 20.0 and out["ours"]["repeats"] == 3
    assert out["ours"][f"ttft_p90_over_{livebench.REFERENCE_ROUTER}"] == 0.5


@pytest.mark.timeout(180)
async def test_smoke_ours_and_round_robin() -> None:
    settings = livebench.Settings(
        engine=livebench.EngineSettings(tokenizer=TINY, num_gpu_blocks=512, max_model_len=4096),
        engines=2,
        routers=("ours", "round_robin"),
        shape=livebench.WorkloadShape(groups=2, questions=2, prefix_words=120, sessions=2, turns=2),
        concurrency=1,
        max_tokens=2,
        events="ipc",
        load_generator="ours",
    )
    rows, skipped = await livebench.measure(settings, lambda _: None)
    assert skipped == []
    assert [(r["router"], r["workload"]) for r in rows] == [
        ("ours", "shared_prefix"),
        ("round_robin", "shared_prefix"),
        ("ours", "multiturn"),
        ("round_robin", "multiturn"),
    ]
    assert all(r["errors"] == 0 and r["prompt_tokens"] > 0 for r in rows)
    assert {r["prefill_sharing"] for r in rows} == {"fcfs"}
    for r in rows:
        if r["router"] == "ours":  # one request at a time: every earlier prefix is reusable
            assert r["ideal_hit_ratio"] > 0
            assert r["hit_ratio"] == r["ideal_hit_ratio"]


def test_prefill_sharing_reaches_the_engines() -> None:
    def settings(*flags: str) -> livebench.Settings:
        argv = ["bench", "live", "--tokenizer", str(TINY), *flags]
        return livebench.settings_from_args(cli.build_parser(argv).parse_args(argv))

    def sharing(s: livebench.Settings) -> str:
        cmd = livebench.engine_command(s, 8000, "ipc:///tmp/e")
        return cmd[cmd.index("--prefill-sharing") + 1]

    assert sharing(settings()) == "fcfs"  # a GPU's prefills compete by default
    independent = settings("--prefill-sharing", "independent")
    assert sharing(independent) == "independent"
    row = livebench.summarise("ours", "multiturn", 0, independent, [], [])
    assert row["prefill_sharing"] == "independent"


def test_targets_read_the_medians() -> None:
    same = {"workload": "w", "hit_ratio": 0.8, "ideal_hit_ratio": 0.8}
    rows = [
        {"router": "ours", **same, "ttft_p90_ms": 45.0},
        {"router": livebench.REFERENCE_ROUTER, **same, "ttft_p90_ms": 50.0},
    ]
    lines = livebench.targets(rows)
    assert lines[0].endswith("(met)")
    assert lines[1].endswith("= 0.90x (met)")
    rows[0]["ttft_p90_ms"], rows[0]["hit_ratio"] = 60.0, 0.7
    assert [line.endswith("(NOT met)") for line in livebench.targets(rows)] == [True, True]


def test_generator_for_the_workload(tmp_path: Path) -> None:
    exe = tmp_path / "inference-perf"
    settings = livebench.Settings(engine=livebench.EngineSettings(tokenizer=TINY), inference_perf=exe)
    assert livebench.generator_for(settings, "shared_prefix") == "ours"  # auto, not installed
    exe.write_text("")
    assert livebench.generator_for(settings, "shared_prefix") == "inference-perf"
    assert livebench.generator_for(settings, "multiturn") == "ours"
    ours = replace(settings, load_generator="ours")
    assert livebench.generator_for(ours, "shared_prefix") == "ours"


async def test_drive_inference_perf_summarises_its_report(tmp_path: Path) -> None:
    exe = test_inferenceperf.stand_in(tmp_path)
    settings = livebench.Settings(
        engine=livebench.EngineSettings(tokenizer=TINY), load_generator="inference-perf", inference_perf=exe
    )
    results, span = await livebench.drive_inference_perf(settings, "http://127.0.0.1:1", tmp_path, "t", 0)
    assert [r.order for r in results] == list(range(6))
    assert all(r.path == inferenceperf.PATH and r.engine is None for r in results)
    assert 0 < span < 10
    parsed = [openai.parse(r.path, r.body, openai.Limits()) for r in results]
    assert len(parsed) == 6
    row = livebench.summarise("ours", "shared_prefix", 0, settings, results, [0] * 6, "inference-perf")
    assert row["load_generator"] == inferenceperf.DESCRIPTION
    assert (row["prompt_tokens"], row["cached_tokens"]) == (6 * 46, 4 * 32)
    assert row["imbalance_max_mean"] is None
