"""Tokenizer-free precise matching (issue #9): speed, agreement and memory of byte matching.

Owner: ``inference_cache.index`` (``bytekeys``, ``bytematch``). On the Qwen tokenizer:

* latency, per request (p50/p99 of ``--repeat`` runs) for first-turn chats of about 1k, 8k
  and 32k tokens whose first ~90% the engine already cached (plus other conversations in
  the same scope): the token path (``encode`` of the whole rendering + ``chain_keys``)
  against the byte path (``request_bytes`` + ``ByteMatcher.match``: walk and boundary
  check). Both then call the same ``Index.longest_prefix``, timed separately;
* agreement with the token path (leading blocks with identical keys) over random
  shared-prefix pairs, adversarial mid-word divergences (anywhere, and within 3 bytes of
  a cached block's end, where over-claims live) and multi-turn chats (the
  engine caching each turn's prompt and reply): equal / over-claimed / under-claimed, and
  the over-claims the boundary check removes (the walk alone);
* memory: traced bytes per auxiliary entry of a ``ByteIndex`` (one replica), beside the
  ``Index``'s own bytes per entry for the same blocks.

Usage: .venv/bin/python hack/bench_bytematch.py [--tokenizer .cache/tokenizers/qwen]
       [--repeat 50] [--pairs 2000] [--block-size 16]
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference_cache.index import bytekeys, bytematch, fingerprint, store
from inference_cache.index.types import Scope
from inference_cache.tokenizer import PromptTokenizer

WORDS = (
    "the cache keeps every token it has seen and serves it again when a request shares a prefix "
    "with an earlier one so routing to the replica that holds it saves prefill time helpful hello"
)
WORD_LIST = WORDS.split(" ")
CJK = "你好世界这是一个测试文本我们在这里写一些中文句子以检验字节匹配的正确性日本語のテキスト"
TAILS = ("lo", "x", "ing", "ful", " y", "é", "好", "🎉", "\n", "  ", "'s", "123", "<|im_end|>")


def text(r: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        x = r.random()
        if x < 0.7:
            out.append(r.choice(WORD_LIST) + r.choice((" ", " ", " ", ", ", ".\n", "  ")))
        elif x < 0.8:
            out.append("".join(r.choice(CJK) for _ in range(r.randint(1, 8))) + r.choice(("，", "。", " ")))
        elif x < 0.85:
            out.append(r.choice(("🎉", "👩‍👩‍👧", "naïve ", "𓀀")))
        else:
            out.append(
                r.choice(("def f(x):\n    return x**2\n", "\tif x:\n\t\tpass\n", '{"a": [1]}', "3141"))
            )
    return "".join(out)


class Model:
    """The tokenizer, a ByteIndex and an Index fed with the same blocks."""

    def __init__(self, tok: PromptTokenizer, bs: int) -> None:
        self.tok = tok
        self.bs = bs
        start = time.perf_counter()
        self.table = bytekeys.ByteTable.of(tok.tokenizer)
        self.table_s = time.perf_counter() - start
        self.bytes = bytekeys.ByteIndex(self.table, bs)
        self.matcher = bytematch.ByteMatcher(tok.tokenizer, self.bytes)
        self.index = store.Index(store.IndexSettings(max_entries=0), clock=lambda: 1e9)

    def ids(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False)

    def cache(self, scope: Scope, replica: str, s: str) -> None:
        ids = self.ids(s)
        keys = fingerprint.chain_keys(ids, self.bs)
        self.index.blocks_stored(scope, replica, keys, [self.bs * (i + 1) for i in range(len(keys))])
        self.bytes.blocks_stored(scope, replica, None, keys, ids[: len(keys) * self.bs])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def chat(r: random.Random, tokens: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    per = max(1, tokens // 30)  # ~3 tokens per generated item, ten messages
    for turn in range(10):
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text(r, per)})
    return messages


def latency(m: Model, repeat: int) -> None:
    print("## latency per request (ms; p50 / p99)")
    print(
        "| prompt tokens | blocks matched | tokenize + chain_keys | bytes + walk + check | longest_prefix |"
    )
    print("|---:|---:|---:|---:|---:|")
    for target in (1000, 8000, 32000):
        r = random.Random(target)
        scope = Scope("t", f"lat{target}", "vllm", "")
        messages = chat(r, target)
        rendered = m.tok.render_chat(messages)
        cut = int(len(rendered) * 0.9)
        m.cache(scope, "warm", rendered[:cut] + text(r, 50))
        for other in range(3):
            m.cache(scope, f"r{other}", m.tok.render_chat(chat(r, target // 2)))
        ids = m.ids(rendered)

        def token_path(s: str = rendered) -> list[bytes]:
            return fingerprint.chain_keys(m.ids(s), m.bs)

        def byte_path(s: str = rendered, scope: Scope = scope) -> bytematch.ByteMatch:
            data = m.matcher.request_bytes(s)
            assert data is not None
            return m.matcher.match(scope, data)

        keys = token_path()
        got = byte_path()
        t_tok = timed(token_path, repeat)
        t_byte = timed(byte_path, repeat)
        t_lp = timed(lambda k=got.keys, sc=scope: m.index.longest_prefix(sc, k), repeat)
        print(
            f"| {len(ids)} | {got.blocks} (token path {_leading(m, scope, keys)}) "
            f"| {pct(t_tok, 0.5):.2f} / {pct(t_tok, 0.99):.2f} "
            f"| {pct(t_byte, 0.5):.3f} / {pct(t_byte, 0.99):.3f} "
            f"| {pct(t_lp, 0.5):.3f} / {pct(t_lp, 0.99):.3f} |"
        )


def _leading(m: Model, scope: Scope, keys: list[bytes]) -> int:
    matched = m.index.longest_prefix(scope, keys)
    return max((p.matched_blocks for p in matched), default=0)


def agreement(m: Model, n: int) -> None:
    print("\n## agreement with the token path")
    print("| workload | pairs | equal | over-claimed | under-claimed | walk alone over-claims | dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    r = random.Random(7)
    workloads = (
        ("shared prefix", n),
        ("mid-word divergence", n),
        ("at a block end", n),
        ("multi-turn chat", n // 10),
    )
    for name, count in workloads:
        equal = over = under = walk_over = dropped = 0
        for i in range(count):
            cached, request = _pair(m, r, name)
            scope = Scope("t", f"{name}{i}", "vllm", "")
            for s in cached:
                m.cache(scope, "r", s)
            want = _leading(m, scope, fingerprint.chain_keys(m.ids(request), m.bs))
            data = m.matcher.request_bytes(request)
            assert data is not None
            got = m.matcher.match(scope, data)
            equal += got.blocks == want
            over += got.blocks > want
            under += got.blocks < want
            walk_over += got.walked_blocks > want
            dropped += got.boundary == "dropped"
            m.index.replica_cleared("r", model=scope.model, tenant="t")
            m.bytes.replica_cleared("r", model=scope.model, tenant="t")
        print(
            f"| {name} | {count} | {100 * equal / count:.2f}% | {over} | {under} "
            f"| {walk_over} ({100 * walk_over / count:.1f}%) | {dropped} |"
        )


def _pair(m: Model, r: random.Random, kind: str) -> tuple[list[str], str]:
    base = text(r, r.randint(20, 300))
    if kind == "shared prefix":
        return [base + text(r, r.randint(0, 60))], base + text(r, r.randint(0, 60))
    if kind == "mid-word divergence":
        cut = r.randint(1, len(base))
        return [base], base[:cut] + r.choice(TAILS) + text(r, r.randint(0, 10))
    if kind == "at a block end":  # within 3 bytes of a cached block's end
        ids = m.ids(base)
        k = r.randint(0, len(ids) // m.bs)
        end = len(m.tok.tokenizer.decode(ids[: k * m.bs], skip_special_tokens=False).encode()) + r.randint(
            -3, 3
        )
        head = base.encode()[: max(end, 0)].decode("utf-8", "ignore")
        return [base], head + r.choice(TAILS) + text(r, r.randint(0, 6))
    messages = [{"role": "system", "content": text(r, 30)}]
    cached = []
    for _turn in range(3):
        messages.append({"role": "user", "content": text(r, r.randint(5, 100))})
        reply = text(r, r.randint(5, 80))
        cached.append(m.tok.render_chat(messages) + reply)
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": text(r, 20)})
    return cached, m.tok.render_chat(messages)


def memory(m: Model, blocks: int) -> None:
    print("\n## memory per entry (one replica, traced)")
    r = random.Random(11)
    prompts = []
    total = 0
    while total < blocks:
        s = text(r, 400)
        ids = m.ids(s)
        keys = fingerprint.chain_keys(ids, m.bs)
        prompts.append((keys, ids[: len(keys) * m.bs]))
        total += len(keys)
    scope = Scope("t", "mem", "vllm", "")
    index = store.Index(store.IndexSettings(max_entries=0), clock=lambda: 1e9)
    aux = bytekeys.ByteIndex(m.table, m.bs)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for keys, _ids in prompts:
        index.blocks_stored(scope, "r", keys, [m.bs * (i + 1) for i in range(len(keys))])
    mid = tracemalloc.get_traced_memory()[0]
    for keys, ids in prompts:
        aux.blocks_stored(scope, "r", None, keys, ids)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print("| structure | entries | bytes/entry |\n|---|---:|---:|")
    print(f"| Index (token keys) | {index.total_entries} | {(mid - before) / index.total_entries:.0f} |")
    print(f"| ByteIndex (auxiliary) | {aux.entries} | {(after - mid) / aux.entries:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, default=Path(".cache/tokenizers/qwen"))
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--memory-blocks", type=int, default=100_000)
    args = parser.parse_args()
    m = Model(PromptTokenizer.load(args.tokenizer), args.block_size)
    print(f"table: recoverable={m.table.recoverable} {m.table.reason} built in {m.table_s * 1000:.0f} ms\n")
    latency(m, args.repeat)
    agreement(m, args.pairs)
    memory(m, args.memory_blocks)


if __name__ == "__main__":
    main()
