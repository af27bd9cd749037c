"""Chat tokenization cost: first turn vs follow-up turn with ``CachedChatEncoder``.

Owner: ``inference_cache.tokenizer`` (numbers for docs/benchmarks.md, "Tokenization").
For chats of about 1k, 8k and 32k tokens (ten turns of English-like text on the Qwen
tokenizer) it times, per call (median of ``--repeat`` runs):

* render: the chat template alone;
* first turn: render + tokenize the whole chat (no cache, what every request would cost);
* follow-up: the same chat through a ``CachedChatEncoder`` that has seen the chat without
  its last two messages (the previous request of the conversation), i.e. render + hash +
  tokenize only the new suffix. A fresh, primed encoder for every run (priming untimed).

Usage: .venv/bin/python hack/bench_tokenizer.py [--tokenizer .cache/tokenizers/qwen] [--repeat 30]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from inference_cache.tokenizer import CachedChatEncoder, PromptTokenizer

TEXT = (
    "the cache keeps every token it has seen and serves it again when a request shares a prefix "
    "with an earlier one so routing to the replica that holds it saves prefill time"
)
WORDS = TEXT.split(" ")


def _chat(tok: PromptTokenizer, target_tokens: int, turns: int = 10) -> list[dict[str, Any]]:
    rng = random.Random(target_tokens)
    per_message = max(1, target_tokens // (2 * turns))
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn in range(2 * turns):
        words = " ".join(rng.choice(WORDS) for _ in range(per_message))
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": words})
    while len(tok.encode_chat(messages)) > target_tokens * 1.05 and len(messages[-1]["content"]) > 10:
        messages[-1]["content"] = messages[-1]["content"][: len(messages[-1]["content"]) * 9 // 10]
    if messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=Path(".cache/tokenizers/qwen"))
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    tok = PromptTokenizer.load(args.tokenizer)
    print(
        "| chat tokens | new suffix tokens | render (ms) | first turn (ms) | follow-up, cached (ms) | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for target in (1_000, 8_000, 32_000):
        chat = _chat(tok, target)
        previous = chat[:-2]
        ids = tok.encode_chat(chat)
        suffix = (
            len(ids)
            - len(tok.encode_chat(previous))
            + len(tok.encode("assistant\n", add_special_tokens=False))
        )
        render, first, follow = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            tok.render_chat(chat)
            t1 = time.perf_counter()
            tok.encode_chat(chat)
            t2 = time.perf_counter()
            encoder = CachedChatEncoder(tok)
            encoder.encode_chat(previous)
            t3 = time.perf_counter()
            assert encoder.encode_chat(chat) == ids
            t4 = time.perf_counter()
            render.append(t1 - t0)
            first.append(t2 - t1)
            follow.append(t4 - t3)
        f, c = _median_ms(first), _median_ms(follow)
        print(f"| {len(ids)} | {suffix} | {_median_ms(render):.2f} | {f:.2f} | {c:.2f} | {f / c:.1f}x |")


if __name__ == "__main__":
    main()
