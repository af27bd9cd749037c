"""Workloads of the routing simulation: requests with arrival times and prefix block ids.

Owner: ``inference_cache.routesim`` (``bench routing``). Place in the flow::

    Mooncake JSONL / seeded generator --> Workload(requests) --> sim.simulate (every router)

A request's ``blocks`` are the ids of its *full* prompt blocks of ``block_tokens`` tokens,
prefix-chained: equal ids at position ``i`` mean the whole prefix up to block ``i`` is equal,
so its KV can be reused (a partial last block is never cached, as in vLLM).

- ``mooncake``: the FAST'25 JSONL (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``; one id = 512 tokens, already prefix hashes), optionally split into smaller
  engine blocks. Arrivals in line order on ties.
- ``shared_prefix``: groups x a long system prompt x questions, Poisson arrivals, shuffled
  (llm-d's published benchmark: 150 groups x 5 prompts, 6000/1200/1000 tokens).
- ``multiturn``: sessions whose prompt is the whole history (a shared system prompt, then
  every previous user message and answer), think time between turns.
- ``rag``: a system prompt, ``docs_per_request`` documents drawn by Zipf popularity from a pool
  larger than one replica's cache, then a question.

Generated workloads describe a prompt as segments ``(content key, tokens)``; block ids chain
``xxh3_64(previous id, the block's content)``, so they are prefix hashes like Mooncake's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

#: Tokens per ``hash_id`` in the Mooncake traces.
MOONCAKE_BLOCK_TOKENS = 512
#: Tokens per block of the generated workloads (vLLM's default block size).
GENERATED_BLOCK_TOKENS = 16
WORKLOADS = ("mooncake", "shared_prefix", "multiturn", "rag")


@dataclass(frozen=True, slots=True)
class Request:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    #: Prefix-chained ids of the full prompt blocks (``input_tokens // block_tokens`` of them).
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    block_tokens: int
    requests: tuple[Request, ...]


def load_mooncake(
    path: Path, *, limit: int | None = None, speedup: float = 1.0, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> Workload:
    """A Mooncake FAST'25 JSONL trace; timestamps divided by ``speedup``. ``block_tokens``
    (a divisor of 512) splits each ``hash_id`` into ``512 / block_tokens`` engine blocks
    ``(id, j)`` (``research/benchmarks.md`` §4.3): equal ids give equal sub-blocks, and the full
    sub-blocks of a partial last 512-token block are reusable by a later request extending it."""
    if block_tokens <= 0 or MOONCAKE_BLOCK_TOKENS % block_tokens:
        raise ValueError(f"block tokens must divide {MOONCAKE_BLOCK_TOKENS}, got {block_tokens}")
    per_id = MOONCAKE_BLOCK_TOKENS // block_tokens
    requests: list[Request] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            n = int(row["input_length"])
            blocks = n // block_tokens
            ids = [int(h) * per_id + j for h in row["hash_ids"] for j in range(per_id)][:blocks]
            requests.append(
                Request(
                    arrival_s=float(row["timestamp"]) / 1000.0 / speedup,
                    input_tokens=n,
                    output_tokens=int(row["output_length"]),
                    blocks=tuple(ids),
                )
            )
    requests.sort(key=lambda r: r.arrival_s)  # stable: line order on ties
    return Workload("mooncake", block_tokens, tuple(requests))


Segment = tuple[str, int]


def chain_blocks(segments: Sequence[Segment], block_tokens: int) -> tuple[int, ...]:
    """Prefix-chained ids of the full blocks of a prompt made of ``segments``."""
    ids: list[int] = []
    parent = 0
    piece: list[str] = []
    room = block_tokens
    for key, tokens in segments:
        offset = 0
        while offset < tokens:
            take = min(room, tokens - offset)
            piece.append(f"{key}:{offset}+{take}")
            offset += take
            room -= take
            if room == 0:
                parent = xxhash.xxh3_64_intdigest("|".join(piece).encode(), seed=parent)
                ids.append(parent)
                piece, room = [], block_tokens
    return tuple(ids)


def _request(arrival_s: float, segments: Sequence[Segment], output_tokens: int) -> Request:
    n = sum(t for _k, t in segments)
    return Request(arrival_s, n, output_tokens, chain_blocks(segments, GENERATED_BLOCK_TOKENS))


def _poisson(rng: random.Random, rate: float, n: int) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def shared_prefix(
    seed: int,
    *,
    groups: int = 150,
    prompts_per_group: int = 5,
    system_tokens: int = 6000,
    question_tokens: int = 1200,
    output_tokens: int = 1000,
    rate_per_s: float = 8.0,
) -> list[Request]:
    rng = random.Random(seed)
    prompts = [(g, p) for g in range(groups) for p in range(prompts_per_group)]
    rng.shuffle(prompts)
    times = _poisson(rng, rate_per_s, len(prompts))
    return [
        _request(t, [(f"sys{g}", system_tokens), (f"q{g}.{p}", question_tokens)], output_tokens)
        for t, (g, p) in zip(times, prompts, strict=True)
    ]


def multiturn(
    seed: int,
    *,
    sessions: int = 200,
    turns: int = 8,
    system_tokens: int = 1000,
    user_tokens: int = 300,
    output_tokens: int = 300,
    session_rate_per_s: float = 1.0,
    think_s: float = 10.0,
) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for s, start in enumerate(_poisson(rng, session_rate_per_s, sessions)):
        history: list[Segment] = [("system", system_tokens)]
        t = start
        for turn in range(turns):
            history.append((f"s{s}.u{turn}", user_tokens))
            out.append(_request(t, list(history), output_tokens))
            history.append((f"s{s}.a{turn}", output_tokens))
            t += rng.expovariate(1.0 / think_s)
    return out


def rag(
    seed: int,
    *,
    requests: int = 2000,
    documents: int = 300,
    document_tokens: int = 2000,
    docs_per_request: int = 3,
    zipf_s: float = 1.1,
    system_tokens: int = 500,
    question_tokens: int = 100,
    output_tokens: int = 200,
    rate_per_s: float = 4.0,
) -> list[Request]:
    """The pool (``documents x document_tokens`` = 600k tokens by default) is larger than
    one replica's cache (300k by default)."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** zipf_s for i in range(documents)]
    out = []
    for i, t in enumerate(_poisson(rng, rate_per_s, requests)):
        docs: list[int] = []
        while len(docs) < docs_per_request:
            d = rng.choices(range(documents), weights)[0]
            if d not in docs:
                docs.append(d)
        segments = [("system", system_tokens), *((f"doc{d}", document_tokens) for d in docs)]
        out.append(_request(t, [*segments, (f"q{i}", question_tokens)], output_tokens))
    return out


def generate(name: str, seed: int, *, limit: int | None = None, speedup: float = 1.0) -> Workload:
    """A generated workload (``shared_prefix``, ``multiturn`` or ``rag``)."""
    makers: dict[str, Callable[[int], list[Request]]] = {
        "shared_prefix": shared_prefix,
        "multiturn": multiturn,
        "rag": rag,
    }
    if name not in makers:
        raise ValueError(f"unknown generated workload {name!r}")
    made: list[Request] = makers[name](seed)
    made.sort(key=lambda r: r.arrival_s)
    reqs = [Request(r.arrival_s / speedup, r.input_tokens, r.output_tokens, r.blocks) for r in made[:limit]]
    return Workload(name, GENERATED_BLOCK_TOKENS, tuple(reqs))
