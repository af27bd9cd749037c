"""What one full cyclic-GC collection costs the server's event loop, by what it holds.

Owner: ``inference_cache.index`` / ``inference_cache.extproc`` (the long-lived structures).
A collection runs inline in whatever the event loop was doing, so its time is added to
some request's latency. Built in process like the server: ``--blocks`` vLLM blocks of real
Qwen text ingested through the mapper into the ``Index`` and a ``ByteIndex`` over 4
replicas (hack/bench_ingest.py's batches), then a burst of ``--recordings`` speculative
recordings of 256 keys (what 32k-token first turns record on the byte path), then
``gc.collect()`` timed in CPU time (median of 5), with the startup objects frozen first
as the server does. Then the approximate index (``matching: approximate``) filled to its
capacity on 8 replicas, with the CPU time of one 256-key ``record`` at capacity. Last, the
memory the ingest keeps per block (``tracemalloc``: mapper, ``Index`` and ``ByteIndex``).

Usage: .venv/bin/python hack/bench_gc.py [--blocks 200000] [--recordings 600]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from pathlib import Path

from bench_ingest import payloads
from tokenizers import Tokenizer

from inference_cache.extproc.approx import ApproxIndex
from inference_cache.extproc.speculative import SpeculativeIndex
from inference_cache.index import bytekeys, store, types
from inference_cache.index.kvevents import decode, mapper
from inference_cache.index.kvevents.config import EndpointConfig

REPO = Path(__file__).resolve().parents[1]


def full_collection_ms() -> float:
    runs = []
    for _ in range(5):
        t0 = time.process_time()
        gc.collect()
        runs.append((time.process_time() - t0) * 1000)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, default=REPO / ".cache" / "tokenizers" / "qwen")
    p.add_argument("--blocks", type=int, default=200_000, help="blocks ingested, in batches of 100")
    p.add_argument("--recordings", type=int, default=600, help="speculative recordings of 256 keys")
    args = p.parse_args()
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    data = payloads(tok, args.blocks // 100, 100, 0)
    index = store.Index(clock=time.time)
    byte_index = bytekeys.ByteIndex(bytekeys.ByteTable.of(tok), 16)
    endpoints = [EndpointConfig(f"10.0.0.{i}:8000", "m", "tcp://127.0.0.1:1") for i in range(4)]
    mappers = [mapper.Mapper(e, index, bytes_sink=byte_index) for e in endpoints]
    gc.collect()
    gc.freeze()
    print("| holding | full collection, ms CPU | GC-tracked objects |")
    print("|---|---:|---:|")
    print(f"| nothing | {full_collection_ms():.2f} | {len(gc.get_objects())} |")
    for i, payload in enumerate(data):
        mappers[i % 4].apply(decode.decode_batch(payload))
    del data
    print(f"| {args.blocks:,} blocks (4 replicas) | {full_collection_ms():.2f} | {len(gc.get_objects())} |")
    spec = SpeculativeIndex(ttl_s=2.0, clock=time.monotonic)
    rng = random.Random(0)
    scope = types.Scope("", "m", "vllm")
    for i in range(args.recordings):
        spec.record(scope, f"10.0.0.{i % 4}:8000", [rng.randbytes(8) for _ in range(256)], 4)
    held = f"+ {args.recordings * 256:,} speculative entries"
    print(f"| {held} | {full_collection_ms():.2f} | {len(gc.get_objects())} |")
    clock = [0.0]
    approx = ApproxIndex(clock=lambda: clock[0])
    shared = [[rng.getrandbits(64) for _ in range(256)] for _ in range(100)]
    fresh = [[rng.getrandbits(64) for _ in range(256)] for _ in range(3000)]
    t0 = time.process_time()
    for i in range(4000):  # 8 replicas: at capacity (31,250 keys each) from about the 1,000th
        clock[0] += 0.01
        approx.record(f"10.0.0.{i % 8}:8000", shared[i % 100] if i % 4 == 0 else fresh[i - i // 4 - 1])
    record_us = (time.process_time() - t0) / 4000 * 1e6
    del shared, fresh
    held = f"+ approximate index, {approx.size:,} entries ({record_us:.0f} µs per 256-key record)"
    print(f"| {held} | {full_collection_ms():.2f} | {len(gc.get_objects())} |")
    del approx, spec, mappers, index, byte_index
    gc.collect()
    data = payloads(tok, args.blocks // 100, 100, 0)
    batches = [decode.decode_batch(p) for p in data]
    del data
    tracemalloc.start()
    index = store.Index(clock=time.time)
    byte_index = bytekeys.ByteIndex(bytekeys.ByteTable.of(tok), 16)
    base = tracemalloc.get_traced_memory()[0]
    mappers = [mapper.Mapper(e, index, bytes_sink=byte_index) for e in endpoints]
    for i, batch in enumerate(batches):
        mappers[i % 4].apply(batch)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"\nmemory kept by ingest (mapper + Index + ByteIndex): {kept / args.blocks:.0f} B per block")


if __name__ == "__main__":
    main()
