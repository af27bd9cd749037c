"""One routing decision in process: ``EndpointPicker.pick`` on byte-path chat follow-ups.

Owner: ``inference_cache.extproc`` (``picker``). What the ext_proc server's event loop pays
per request between receiving the body and answering, without Envoy or gRPC around it:
parse, render, request bytes, the byte walk (``bytematch``), the index lookup
(``Index.longest_prefix``), ranking and the decision. The fleet: 4 replicas, the Qwen
tokenizer, ``--conversations`` first turns of ``--size`` tokens (``bench extproc``'s
conversations) cached each on one replica, fed to the ``Index`` and the ``ByteIndex``
as the KV-event mapper feeds them; then every conversation's follow-up turn is picked.
Each ``--jump-blocks`` value gets its own picker over the same cache (0: no jumps), and
the rounds alternate between them. Wall time with the cyclic GC frozen (the server
freezes it too); medians over the conversations of each round, then the median round.

Usage: .venv/bin/python hack/bench_pick.py [--size 8192] [--conversations 200]
       [--jump-blocks 0,16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import time
from pathlib import Path

from inference_cache import config, tokenizer
from inference_cache.extproc import bench, openai, picker
from inference_cache.extproc.picking import PickRequest
from inference_cache.index import bytekeys, fingerprint, policy, store, types

REPO = Path(__file__).resolve().parents[1]
BS = 16
REPLICAS = ("127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003", "127.0.0.1:1004")
STEPS = ("pick", "parse", "render", "walk", "index lookup", "rank")


def _setup(
    tok: tokenizer.PromptTokenizer, convs: list[bench.Conversation], jump_blocks: int
) -> tuple[picker.EndpointPicker, store.Index, bytekeys.ByteIndex]:
    cfg = config.Config(
        models=(config.ModelConfig(bench.MODEL, block_size=BS, tokenizer="qwen", matching="bytes"),),
        endpoints=tuple(
            config.EndpointConfig(address=a, model=bench.MODEL, tenant="t", kv_events="tcp://127.0.0.1:1")
            for a in REPLICAS
        ),
    )
    config.validate(cfg)
    index = store.Index(store.IndexSettings())
    bidx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tok.tokenizer), BS, jump_blocks=jump_blocks)
    scope = types.Scope("t", bench.MODEL, types.HASH_SCHEME_VLLM, "")
    rng = random.Random(0)
    for conv in convs:
        ids = list(conv.first_tokens)
        keys = fingerprint.chain_keys(ids, BS)
        replica = rng.choice(REPLICAS)
        bidx.blocks_stored(scope, replica, None, keys, ids[: len(keys) * BS])
        index.blocks_stored(scope, replica, keys, [BS * (i + 1) for i in range(len(keys))])
    p = picker.EndpointPicker(
        cfg,
        index,
        policy.PolicyStore(),
        tokenizers={bench.MODEL: tok},
        byte_indexes={bench.MODEL: bidx},
    )
    return p, index, bidx


async def _round(
    p: picker.EndpointPicker, index: store.Index, convs: list[bench.Conversation]
) -> dict[str, float]:
    route = p.routes[bench.MODEL]
    assert route.bytes is not None and route.tokenizer is not None
    scope = types.Scope("t", bench.MODEL, types.HASH_SCHEME_VLLM, "")
    limits = p.settings.limits
    times: dict[str, list[float]] = {k: [] for k in STEPS}
    clock = time.perf_counter
    for conv in convs:
        request = PickRequest(method="POST", path=bench.CHAT_PATH, headers={}, body=conv.follow_up)
        t0 = clock()
        decision = await p.pick(request)
        t1 = clock()
        assert isinstance(decision, picker.Decision), decision
        p.finished(decision, picker.Outcome(response_complete=True))
        # the steps again, one by one (the same work ``pick`` did)
        parsed = openai.parse(bench.CHAT_PATH, conv.follow_up, limits)
        t2 = clock()
        data = route.bytes.request_bytes(picker.render(route.tokenizer, parsed))
        t3 = clock()
        assert data is not None
        match = route.bytes.match(scope, data)
        t4 = clock()
        index.longest_prefix(scope, match.keys)
        t5 = clock()
        prompt = picker.Prompt(
            None, match.estimated_total_tokens(BS), match.keys, picker.MATCH_BYTES, seed=b""
        )
        p.rank(route, "", prompt, REPLICAS)
        t6 = clock()
        for step, dt in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
            times[step].append(dt)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=str(REPO / ".cache" / "tokenizers" / "qwen"))
    ap.add_argument("--size", type=int, default=8192, help="first-turn tokens")
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--jump-blocks", default="0,16", help="comma-separated ByteIndex jump spans")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tok = tokenizer.PromptTokenizer.load(Path(args.tokenizer))
    convs = bench.conversations(tok, args.size, args.conversations, 0)
    spans = [int(x) for x in args.jump_blocks.split(",")]
    setups = {j: _setup(tok, convs, j) for j in spans}
    gc.freeze()
    rounds: dict[int, list[dict[str, float]]] = {j: [] for j in spans}
    for _ in range(args.rounds):
        for j, (p, index, _bidx) in setups.items():
            rounds[j].append(await _round(p, index, convs))
    blocks = len(convs[0].first_tokens) // BS
    print(
        f"{len(convs)} follow-ups of ~{len(convs[0].follow_tokens)} tokens, ~{blocks} cached blocks each,"
        f" median of {args.rounds} rounds (ms, p50 over the conversations)"
    )
    print("| jump_blocks | " + " | ".join(STEPS) + " |")
    print("|---:|" + "---:|" * len(STEPS))
    for j in spans:
        cells = [statistics.median(r[k] for r in rounds[j]) for k in STEPS]
        print(f"| {j} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
