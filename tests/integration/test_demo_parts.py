"""The demo's pure parts: when a follow-up landed, the pass/fail verdict, the run's
aggregates and report, the flags, and the workload generator."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from inference_cache import demo, demo_workload
from inference_cache.demo_workload import WorkloadSettings

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"

LANDED = demo.Row(
    label="chat-1 t2",
    follow_up=True,
    prompt_tokens=300,
    held={"e1": 256, "e2": 64, "e3": 0},
    sent_to="e1",
    cached_tokens=256,
    ttft_s=0.010,
)


def test_a_follow_up_landed_when_its_engine_holds_the_longest_run_and_says_so() -> None:
    assert LANDED.landed and LANDED.holders == ["e1"]
    tie = dataclasses.replace(LANDED, held={"e1": 128, "e2": 128, "e3": 0}, sent_to="e2", cached_tokens=128)
    assert tie.landed and tie.holders == ["e1", "e2"]
    cold = dataclasses.replace(LANDED, held={"e1": 0, "e2": 0}, sent_to="e2", cached_tokens=0)
    assert cold.landed and cold.holders == []  # nothing cached anywhere: any engine will do


@pytest.mark.parametrize(
    "change",
    [
        {"sent_to": "e2", "cached_tokens": 64},  # a shorter holder
        {"sent_to": "e3", "cached_tokens": 0},  # no holder at all
        {"cached_tokens": 240},  # the engine answered differently from its cache state
        {"sent_to": "e9"},  # not one of the engines
    ],
)
def test_a_follow_up_missed(change: dict[str, object]) -> None:
    assert not dataclasses.replace(LANDED, **change).landed  # type: ignore[arg-type]


def run(routing: str, rows: list[demo.Row]) -> demo.Run:
    return demo.Run(routing, ["e1", "e2", "e3"], rows)


FIRST = dataclasses.replace(
    LANDED, label="chat-1 t1", follow_up=False, held={}, cached_tokens=0, ttft_s=0.030
)
MISSED = dataclasses.replace(LANDED, sent_to="e2", cached_tokens=64, ttft_s=0.024)


def test_a_run_adds_up_its_requests() -> None:
    r = run("cache-aware", [FIRST, LANDED, dataclasses.replace(LANDED, ttft_s=0.020)])
    assert r.per_engine() == {"e1": 3, "e2": 0, "e3": 0}
    assert (r.prompt_tokens, r.cached_tokens) == (900, 512)
    assert r.hit_ratio == pytest.approx(512 / 900)
    assert r.ttft_ms() == pytest.approx((20.0, 28.0))
    assert [row.label for row in r.follow_ups] == ["chat-1 t2", "chat-1 t2"] and r.landed == 2
    assert run("round-robin", []).hit_ratio == 0.0 and run("round-robin", []).ttft_ms() == (0.0, 0.0)


def test_the_verdict_needs_a_better_hit_ratio_and_every_follow_up_landed() -> None:
    aware = run("cache-aware", [FIRST, LANDED])
    baseline = run("round-robin", [FIRST, MISSED])
    assert demo.verdict(aware, baseline) == demo.Verdict(True, ())
    worse = demo.verdict(baseline, aware)
    assert not worse.ok and len(worse.reasons) == 2
    assert "does not beat" in worse.reasons[0] and "chat-1 t2" in worse.reasons[1]
    assert not demo.verdict(aware, aware).ok  # equal is not better


def test_the_report_shows_both_runs_side_by_side() -> None:
    report = demo.Report(
        engines=["e1=127.0.0.1:1", "e2=127.0.0.1:2", "e3=127.0.0.1:3"],
        envoy="http://127.0.0.1:10000 (envoy-buffered.yaml) -> ext_proc 127.0.0.1:9002",
        runs=[run("cache-aware", [FIRST, LANDED]), run("round-robin", [FIRST, MISSED])],
    )
    text = demo.format_report(report)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("chat-1 t2"))
    assert row.split() == [
        "chat-1",
        "t2",
        "300",
        "e1",
        "(256)",
        "e1",
        "256",
        "10.0",
        "e1",
        "(256)",
        "e2",
        "64",
        "24.0",
    ]
    summary = {line[:22].strip(): line[22:].split() for line in lines if line[:22].strip()}
    assert summary["hit ratio"] == ["42.7%", "10.7%"]
    assert summary["requests per engine"] == ["e1:2", "e2:0", "e3:0", "e1:1", "e2:1", "e3:0"]
    assert summary["prompt tokens"] == ["600", "600"] and summary["cached tokens"] == ["256", "64"]
    assert summary["TTFT p50 / p90"] == ["20.0", "/", "28.0", "ms", "27.0", "/", "29.4", "ms"]
    assert summary["follow-ups on holder"] == ["1/1", "0/1"]
    assert lines[-1].startswith("PASS: cache-aware hit ratio 42.7% > round robin 10.7%")
    swapped = dataclasses.replace(report, runs=report.runs[::-1])
    assert demo.format_report(swapped).splitlines()[-1].startswith("FAIL: ")


def test_percentiles_interpolate() -> None:
    assert demo.percentile([], 50) == 0.0
    assert demo.percentile([0.5], 90) == 0.5
    assert demo.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert demo.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_the_workload_is_seeded_and_follow_ups_continue_earlier_requests() -> None:
    settings = WorkloadSettings(seed=5, conversations=4, turns=3, rag_requests=6)
    workload = demo_workload.generate(settings)
    assert workload == demo_workload.generate(settings)
    assert workload != demo_workload.generate(dataclasses.replace(settings, seed=6))
    assert len(workload.first) == 4 + 3 and len(workload.follow_ups) == 4 * 2 + 3
    seen = {step.conversation for step in workload.first}
    for step in workload.follow_ups:
        if step.conversation.startswith("chat-"):
            assert step.conversation in seen
            assert [role for role, _ in step.messages] == ["user"]
        seen.add(step.conversation)
    systems = {step.messages[0] for step in workload.first}
    assert len(systems) == len(demo_workload.PERSONAS) + 1  # shared personas + the RAG prompt


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_missing_tokenizer_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(demo.DemoError, match=r"no tokenizer\.json"):
        demo.settings_from_args(parse("--tokenizer", str(tmp_path)))


def test_a_missing_envoy_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    args = parse("--tokenizer", str(TINY_TOKENIZER), "--envoy", str(tmp_path / "envoy"))
    with pytest.raises(demo.DemoError, match=r"not an executable.*make envoy"):
        demo.settings_from_args(args)


def test_flags_become_settings(tmp_path: Path) -> None:
    binary = tmp_path / "envoy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    settings = demo.settings_from_args(
        parse(
            *("--tokenizer", str(TINY_TOKENIZER), "--envoy", str(binary), "--engines", "3"),
            *("--seed", "7", "--conversations", "2", "--turns", "2", "--rag-requests", "0"),
        )
    )
    assert (settings.engines, settings.seed, settings.envoy) == (3, 7, str(binary))
    assert settings.num_gpu_blocks == 320  # not the Qwen tokenizer
    assert settings.workload == WorkloadSettings(seed=7, conversations=2, turns=2, rag_requests=0)


def test_with_the_warm_up_on_a_cold_first_template_request_fails_the_demo() -> None:
    first = dataclasses.replace(
        LANDED, label="desk-1 q1", follow_up=False, templated=True, template_first=True
    )
    cold = dataclasses.replace(first, held={"e1": 0, "e2": 0, "e3": 0}, cached_tokens=0)
    baseline = run("round-robin", [dataclasses.replace(first, sent_to="e2", cached_tokens=0)])
    assert demo.verdict(run("cache-aware", [first]), baseline, warmup=True).ok
    assert run("cache-aware", [first]).first_hits == 1
    result = demo.verdict(run("cache-aware", [cold, LANDED]), baseline, warmup=True)
    assert result.reasons == ("with the warm-up on, first template requests that did not hit: desk-1 q1",)
    assert demo.verdict(run("cache-aware", [cold, LANDED]), baseline).ok  # warm-up off: not required


def test_the_templated_workload_asks_every_template_in_turn() -> None:
    w = demo_workload.generate(WorkloadSettings(templates=2, template_requests=3))
    assert [name for name, _spec in w.templates] == ["desk-1", "desk-2"]
    assert [(s.label, s.first) for s in w.templated[:3]] == [
        ("desk-1 q1", True),
        ("desk-2 q1", True),
        ("desk-1 q2", False),
    ]
    assert len(w.templated) == 6
    # the templates do not change the rest of the workload
    assert w.first == demo_workload.generate(WorkloadSettings(templates=0)).first
