"""Shared helpers of the integration tests: fake engines (in-process, tiny tokenizer,
events over ``ipc://``) and servers assembled by :mod:`inference_cache.demo`.

What is real: the engines' HTTP API and ZMQ events, the server's subscribers, index and
gRPC ``LookupRoute`` over loopback. Nothing is faked. Helpers only talk to those.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from inference_cache import demo
from inference_cache.demo_workload import WORDS
from inference_cache.extproc.serve import Server
from inference_cache.index.policy import NamespacePolicy
from inference_cache.proto import pb

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "data" / "tiny-tokenizer"
BS = 16
SYNC_S = 10.0
Scores = list[tuple[str, int]]


def floors_off(server: Server, tenant: str) -> None:
    """Every holder gets listed and scored: no minimumMatchedTokens, no routingFloorScore."""
    server.policies.replace([NamespacePolicy(tenant, minimum_matched_tokens=0, routing_floor_score=0.0)])


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"[{seed}] " + " ".join(rng.choice(WORDS) for _ in range(words))


async def tokens(c: demo.Cluster, prompt: str) -> list[int]:
    body = await c.post("e1", "/tokenize", {"prompt": prompt, "add_special_tokens": False})
    ids: list[int] = body["tokens"]
    return ids


async def send(c: demo.Cluster, engine: str, ids: Sequence[int]) -> int:
    """Complete ``ids`` on ``engine`` (one output token: only the prompt's full blocks get
    cached); -> the engine's ``cached_tokens``."""
    body = await c.post(
        engine, "/v1/completions", {"model": demo.MODEL, "prompt": list(ids), "max_tokens": 1}
    )
    assert body["usage"]["prompt_tokens"] == len(ids)
    cached: int = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    return cached


async def lookup(c: demo.Cluster, ids: Sequence[int]) -> Scores:
    """After ``c``'s server caught up: [(engine, matched_tokens)], best first."""
    await c.wait_ingested(SYNC_S)
    response = await c.stub.LookupRoute(
        pb.LookupRouteRequest(model_id=demo.MODEL, token_ids=ids), timeout=5.0
    )
    return [(c.name_of(s.replica_id), s.matched_tokens) for s in response.replica_scores]


def cap(ids: Sequence[int]) -> int:
    """The most an engine reports as cached: whole blocks, the last prompt token recomputed."""
    return (len(ids) - 1) // BS * BS


def full_blocks(n: int) -> int:
    return n // BS * BS
