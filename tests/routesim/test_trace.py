"""Workloads: the Mooncake JSONL reader and the seeded generators' prefix-chained block ids."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from inference_cache.routesim import trace


def test_mooncake_keeps_full_blocks_sorts_by_time_and_applies_speedup(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 3000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 7, 8]},
        {"timestamp": 1000, "input_length": 1024, "output_length": 9, "hash_ids": [0, 5]},
        {"timestamp": 1000, "input_length": 600, "output_length": 1, "hash_ids": [0, 6]},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = trace.load_mooncake(path, speedup=2.0)
    assert w.block_tokens == 512
    assert [(r.arrival_s, r.blocks) for r in w.requests] == [(0.5, (0, 5)), (0.5, (0,)), (1.5, (0, 7))]
    assert len(trace.load_mooncake(path, limit=1).requests) == 1


def test_mooncake_ids_split_into_engine_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [0, 7]},
        {"timestamp": 1, "input_length": 1024, "output_length": 1, "hash_ids": [0, 7]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = trace.load_mooncake(path, block_tokens=128).requests
    # 1000 tokens: 7 full 128-token blocks, the first 3 of id 7's four; the longer prompt reuses them.
    assert a.blocks == (0, 1, 2, 3, 28, 29, 30)
    assert b.blocks == (*a.blocks, 31)
    with pytest.raises(ValueError, match="divide"):
        trace.load_mooncake(path, block_tokens=100)


def test_chained_blocks_are_equal_exactly_as_long_as_the_prefix_is() -> None:
    a = trace.chain_blocks([("sys", 40), ("q1", 30)], 16)
    b = trace.chain_blocks([("sys", 40), ("q2", 30)], 16)
    assert len(a) == 70 // 16
    assert a[:2] == b[:2]  # blocks 0-1 lie inside the shared 40-token system prompt
    assert a[2] != b[2]  # block 2 mixes the system prompt's tail with the question
    assert (
        trace.chain_blocks([("x", 16), ("y", 16)], 16)[1] != trace.chain_blocks([("z", 16), ("y", 16)], 16)[1]
    )


SMALL = {
    "shared_prefix": lambda seed: trace.shared_prefix(seed, groups=10, prompts_per_group=3),
    "multiturn": lambda seed: trace.multiturn(seed, sessions=10, turns=3),
    "rag": lambda seed: trace.rag(seed, requests=40, documents=20),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_generators_are_seeded_and_reuse_prefixes(name: str) -> None:
    reqs = SMALL[name](3)
    assert reqs == SMALL[name](3)
    assert reqs != SMALL[name](4)
    firsts = [r.blocks[0] for r in reqs]
    assert len(set(firsts)) < len(firsts)
    assert all(len(r.blocks) == r.input_tokens // trace.GENERATED_BLOCK_TOKENS for r in reqs)


def test_generate_sorts_by_arrival_limits_and_applies_speedup() -> None:
    w = trace.generate("multiturn", seed=1, limit=50, speedup=2.0)
    full = sorted(trace.multiturn(1), key=lambda r: r.arrival_s)
    assert w.name == "multiturn" and len(w.requests) == 50
    assert [r.arrival_s for r in w.requests] == [r.arrival_s / 2 for r in full[:50]]
    with pytest.raises(ValueError, match="unknown"):
        trace.generate("nope", seed=0)


def test_multiturn_prompts_extend_the_previous_turn() -> None:
    w = trace.multiturn(0, sessions=1, turns=3)
    assert [len(r.blocks) for r in w] == sorted(len(r.blocks) for r in w)
    for prev, nxt in itertools.pairwise(w):
        assert nxt.blocks[: len(prev.blocks)] == prev.blocks
