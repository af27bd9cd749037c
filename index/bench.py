"""``inference-cache bench index``: ingest throughput, lookup latency, memory per entry.

Owner: ``inference_cache.index``. Registered by ``inference_cache.cli`` (``bench index``).
Each index size is built in a fresh child process (``multiprocessing`` spawn) so the
memory figure is an honest RSS delta (``/proc/self/statm`` resident set before/after the
build, divided by the (block, replica) entries; it includes the key bytes the index holds).

Workload: one scope (``bench``/``model``/``vllm``), 4 replicas, chains of 256 blocks of
16 tokens ingested through the KV-event sink (``Index.blocks_stored``), each chain on one
replica, with a fake clock advancing 1 ms per chain (no cap, no eviction). Lookups are
hash-keyed chain lookups (``Index.lookup``) of the first 64 or all 256 blocks of stored
chains, timed one by one with ``time.perf_counter_ns``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

from inference_cache.index import store, types

_CHAIN = 256
_BLOCK_TOKENS = 16
_REPLICAS = 4
_LOOKUP_CHAINS = (64, 256)
_FULL_SIZES = (1_000_000, 10_000_000)
_QUICK_SIZES = (20_000, 100_000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--sizes",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="comma-separated index sizes in (block, replica) entries (default 1000000,10000000)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (20000,100000), for a smoke run")
    parser.add_argument("--lookups", type=int, default=2000, help="lookups timed per chain length")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the keys")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def measure(size: int, lookups: int, seed: int) -> list[dict[str, Any]]:
    """Build one index of ``size`` entries and measure it (runs in a child process)."""
    rng = random.Random(seed)
    now = [1_700_000_000.0]
    index = store.Index(store.IndexSettings(max_entries=0), clock=lambda: now[0])
    scope = types.Scope("bench", "model", "vllm")
    counts = [_BLOCK_TOKENS * (i + 1) for i in range(_CHAIN)]
    sample: list[list[bytes]] = []
    stride = max(1, size // _CHAIN // 1000)
    rss0 = _rss_bytes()
    spent_ns = 0
    n = 0
    while index.total_entries < size:
        raw = rng.randbytes(8 * _CHAIN)
        keys = [raw[i : i + 8] for i in range(0, len(raw), 8)]
        if n % stride == 0:
            sample.append(keys)
        t0 = time.perf_counter_ns()
        index.blocks_stored(scope, f"10.0.0.{n % _REPLICAS}:8000", keys, counts, now[0])
        spent_ns += time.perf_counter_ns() - t0
        now[0] += 0.001
        n += 1
    rss = _rss_bytes() - rss0
    entries = index.total_entries
    rows: list[dict[str, Any]] = []
    for length in _LOOKUP_CHAINS:
        lat: list[int] = []
        for i in range(lookups):
            chain = sample[i % len(sample)][:length]
            req = types.LookupRequest(scope, block_hashes=chain, block_token_counts=counts[:length])
            t0 = time.perf_counter_ns()
            result = index.lookup(req)
            lat.append(time.perf_counter_ns() - t0)
            if result.strategy is not types.Strategy.PREFIX_MATCH:
                raise RuntimeError(f"bench lookup missed: {result.strategy}")
        lat.sort()
        rows.append(
            {
                "entries": entries,
                "chain_blocks": length,
                "ingest_blocks_per_s": round(entries * 1e9 / spent_ns),
                "lookup_p50_us": round(_percentile(lat, 0.50), 1),
                "lookup_p99_us": round(_percentile(lat, 0.99), 1),
                "rss_per_entry_bytes": round(rss / entries, 1),
                "build_s": round(spent_ns / 1e9, 2),
            }
        )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    sizes = args.sizes or (_QUICK_SIZES if args.quick else _FULL_SIZES)
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for size in sizes:
            rows += pool.apply(measure, (size, args.lookups, args.seed))
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
