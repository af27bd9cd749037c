"""The demo's pure parts: the agreement rule of one row and the workload generator."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from inference_cache import demo, demo_workload
from inference_cache.demo_workload import WorkloadSettings

HINTED = demo.Row(
    label="chat-1 t2",
    prompt_tokens=300,
    routed=True,
    held={"e1": 256, "e2": 64, "e3": 0},
    sent_to="e1",
    cached_tokens=256,
    reason="PREFIX_MATCH",
    chosen="e1",
    matched_tokens=256,
    floor=64,
    cap=288,
)


def test_a_hint_agrees_when_the_chosen_replica_holds_the_longest_run_exactly() -> None:
    assert HINTED.agrees
    # the index counts the whole prompt, the engine recomputes its last block
    exact = dataclasses.replace(HINTED, prompt_tokens=288, matched_tokens=288, held={"e1": 272}, cap=272)
    assert dataclasses.replace(exact, cached_tokens=272).agrees


@pytest.mark.parametrize(
    "change",
    [
        {"chosen": "e2", "matched_tokens": 64, "sent_to": "e2", "cached_tokens": 64},  # not the longest
        {"matched_tokens": 272},  # over-counts (a stale index)
        {"matched_tokens": 240},  # under-counts
        {"cached_tokens": 240},  # the engine answered differently from its cache state
        {"chosen": "e9"},  # a replica that is not one of the engines
    ],
)
def test_a_hint_disagrees(change: dict[str, object]) -> None:
    assert not dataclasses.replace(HINTED, **change).agrees  # type: ignore[arg-type]


def test_no_hint_agrees_only_when_no_replica_stands_out() -> None:
    no_hint = dataclasses.replace(HINTED, reason="NO_HINT", chosen=None, matched_tokens=0)
    assert not no_hint.agrees
    equal = {"e1": 128, "e2": 128, "e3": 128}
    assert dataclasses.replace(no_hint, held=equal, cached_tokens=128).agrees
    below_floor = {"e1": 48, "e2": 0, "e3": 0}
    assert dataclasses.replace(no_hint, held=below_floor, cached_tokens=48).agrees


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


def test_a_missing_tokenizer_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(demo.DemoError, match=r"no tokenizer\.json"):
        demo.settings_from_args(parser.parse_args(["--tokenizer", str(tmp_path)]))
