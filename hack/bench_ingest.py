"""KV-event ingest cost per block: decode -> mapper -> Index (+ ByteIndex), in process.

Owner: ``inference_cache.index.kvevents``. What the server's event loop pays per engine
``BlockStored`` batch: ``decode.decode_batch`` (msgpack + validation), ``Mapper.apply``
(re-keying every block with our fingerprint chain), ``Index.blocks_stored`` and, for a
model matched by bytes, ``ByteIndex.blocks_stored``. Batches are encoded as vLLM 0.33
publishes them (the fake engine's encoder), one ``BlockStored`` of ``--blocks`` blocks of
16 Qwen tokens of real text each (this repository's docs, so token ids are as skewed as
a real prompt's), a fresh chain per batch. Timed with the cyclic GC frozen and off (the
server freezes it too), CPU time, median of ``--repeat`` runs.

Usage: .venv/bin/python hack/bench_ingest.py [--batches 400] [--blocks 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer

from inference_cache.fakeengine import events as fe
from inference_cache.fakeengine.versions import parse
from inference_cache.index import bytekeys, store
from inference_cache.index.kvevents import decode, mapper
from inference_cache.index.kvevents.config import EndpointConfig

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16


def payloads(tok: Tokenizer, batches: int, blocks: int, seed: int) -> list[bytes]:
    text = "".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    ids = tok.encode(text, add_special_tokens=False).ids
    r = random.Random(seed)
    out = []
    for _ in range(batches):
        start = r.randrange(len(ids) - blocks * BLOCK)
        ev = fe.BlockStored(
            block_hashes=[r.getrandbits(63) for _ in range(blocks)],
            parent_block_hash=None,
            token_ids=ids[start : start + blocks * BLOCK],
            block_size=BLOCK,
        )
        out.append(fe.encode_batch(parse("0.33.0"), 1.0, [ev]))
    return out


def run_once(tok: Tokenizer, data: list[bytes], with_bytes: bool) -> float:
    """CPU seconds to ingest ``data`` into a fresh index."""
    idx = store.Index(clock=time.time)
    bidx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tok), BLOCK) if with_bytes else None
    m = mapper.Mapper(EndpointConfig("10.0.0.1:8000", "m", "tcp://127.0.0.1:1"), idx, bytes_sink=bidx)
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        t0 = time.process_time()
        for payload in data:
            m.apply(decode.decode_batch(payload))
        return time.process_time() - t0
    finally:
        gc.enable()
        gc.unfreeze()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, default=REPO / ".cache" / "tokenizers" / "qwen")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--blocks", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    data = payloads(tok, args.batches, args.blocks, args.seed)
    blocks = args.batches * args.blocks
    print("| path | µs per block | ms per 100-block batch |")
    print("|---|---:|---:|")
    for name, with_bytes in (("tokens (Index)", False), ("bytes (Index + ByteIndex)", True)):
        s = statistics.median(run_once(tok, data, with_bytes) for _ in range(args.repeat))
        print(f"| {name} | {s / blocks * 1e6:.2f} | {s / blocks * 100 * 1e3:.3f} |")


if __name__ == "__main__":
    main()
