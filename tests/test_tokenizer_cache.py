"""``CachedChatEncoder``: cached ids equal uncached ids for random multi-turn chats (seeded
random), follow-ups tokenize only their suffix, the LRU bounds, and the cut rules
(no cut after ``rstrip``/``single_word``/normalized added tokens, nor where another added
token overlaps)."""

from __future__ import annotations

import array
import json
import random
from pathlib import Path

import pytest

from inference_cache.tokenizer import CachedChatEncoder, Probe, PromptTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-tokenizer"
QWEN = REPO / ".cache" / "tokenizers" / "qwen"

WORDS = [
    "cache",
    " the",
    "  ",
    "\n",
    "\n\n",
    "é",
    "🚀",
    "日本",
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "x",
    "1",
]
ROLES = ["user", "assistant"]


def _tokenizer(name: str) -> PromptTokenizer:
    path = {"qwen": QWEN, "tiny": TINY}[name]
    if not (path / "tokenizer.json").exists():
        pytest.skip("the Qwen tokenizer is built by `make tokenizer`")
    return PromptTokenizer.load(path)


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 30)))


@pytest.mark.parametrize("name", ["qwen", "tiny"])
def test_cached_equals_uncached_on_random_conversations(name: str) -> None:
    tok = _tokenizer(name)
    cached = CachedChatEncoder(tok, max_entries=16)
    rng = random.Random(20240604)
    for _ in range(60):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": _text(rng)})
        for turn in range(rng.randint(1, 6)):
            messages.append({"role": ROLES[turn % 2], "content": _text(rng)})
            if messages[-1]["role"] == "assistant":
                continue
            options = {"add_generation_prompt": rng.random() < 0.8}
            assert cached.encode_chat(messages, **options) == tok.encode_chat(messages, **options)
            text = tok.render_chat(messages, **options)
            cut = rng.randint(0, len(text))  # arbitrary prefixes of seen text, too
            assert cached.encode_text(text[:cut]) == tok.encode(text[:cut], add_special_tokens=False)
    assert cached.stats.hits > 50


def test_follow_up_turn_tokenizes_only_its_suffix() -> None:
    tok = _tokenizer("tiny")
    cached = CachedChatEncoder(tok)
    chat = [{"role": "system", "content": "s " * 500}, {"role": "user", "content": "first question"}]
    first = cached.encode_chat(chat)
    assert (cached.stats.hits, cached.stats.misses) == (0, 1)
    follow_up = [
        *chat,
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "and then?"},
    ]
    before = cached.stats.encoded_chars
    assert cached.encode_chat(follow_up) == tok.encode_chat(follow_up)
    assert cached.stats.hits == 1
    # everything up to the generation prompt's <|im_start|> came from the cache
    assert cached.stats.reused_tokens == len(first) - len(tok.encode("assistant\n", add_special_tokens=False))
    new_text = len(tok.render_chat(follow_up)) - len(tok.render_chat(chat))
    assert cached.stats.encoded_chars - before < new_text + len("assistant\n") + 1
    assert cached.encode_chat(chat, add_special_tokens=True) == tok.encode_chat(chat, add_special_tokens=True)


def test_lru_bounds() -> None:
    tok = _tokenizer("tiny")
    cached = CachedChatEncoder(tok, max_entries=3, max_tokens=10_000)
    for i in range(5):
        cached.encode_chat([{"role": "user", "content": f"conversation {i}"}])
    assert len(cached) == 3
    assert 0 < cached.cached_tokens < 10_000
    small = CachedChatEncoder(tok, max_tokens=20)
    small.encode_chat([{"role": "user", "content": "long " * 50}])
    assert len(small) == 0 and small.cached_tokens == 0
    small.encode_chat([{"role": "user", "content": "a"}])
    small.encode_chat([{"role": "user", "content": "b"}])
    assert small.cached_tokens <= 20
    small.clear()
    assert len(small) == 0 and small.cached_tokens == 0


def test_block_keys_live_beside_the_cached_prefix() -> None:
    """``finish_entry`` names the entry caching the result's prefix; what the caller keeps
    in its ``block_keys`` comes back with the next probe of that prefix, and goes with it."""
    tok = _tokenizer("tiny")
    cached = CachedChatEncoder(tok, max_entries=1)
    chat = [{"role": "user", "content": "first question " * 20}]
    text = tok.render_chat(chat)
    miss = cached.lookup(text)
    assert not miss.hit and miss.block_keys == {}
    first = cached.finish_entry(text, miss)
    assert first.ids == tok.encode(text, add_special_tokens=False)
    assert 0 < first.cached < len(first.ids)  # up to the generation prompt's <|im_start|>
    first.block_keys["k"] = (b"x",)
    follow = tok.render_chat([*chat, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])
    probe = cached.lookup(follow)
    assert probe.hit and len(probe.prefix) == first.cached and probe.block_keys == {"k": (b"x",)}
    again = cached.finish_entry(follow, probe)
    assert again.ids == tok.encode(follow, add_special_tokens=False)
    assert again.ids[: first.cached] == first.ids[: first.cached]
    assert again.cached > first.cached and again.block_keys == {}  # a new, longer prefix
    assert cached.lookup(text).hit is False  # max_entries=1: the first prefix went ...
    assert cached.lookup(follow).block_keys is again.block_keys  # ... the new one is here
    # the same prefix stored twice keeps its entry (and block keys): same text, same ids
    again.block_keys["k"] = (b"y",)
    assert cached.finish_entry(follow, cached.lookup(follow)).block_keys == {"k": (b"y",)}
    assert cached.finish_entry(follow, miss_of(cached, follow)).block_keys == {"k": (b"y",)}
    # nothing cached (the prompt has no cut): no entry to keep keys in
    plain = cached.finish_entry("no added tokens", cached.lookup("no added tokens"))
    assert (plain.cached, plain.block_keys) == (0, {})


def miss_of(cached: CachedChatEncoder, text: str) -> Probe:
    """A probe that found nothing (as a concurrent first request would have)."""
    probe = cached.lookup(text)
    return Probe(0, array.array("I"), probe.keys, hit=False)


def _with_added(tmp_path: Path, **flags: bool) -> PromptTokenizer:
    tokenizer = json.loads((TINY / "tokenizer.json").read_text())
    tokenizer["added_tokens"][2].update(flags)  # <|im_end|>
    base = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    # a longer token with <|im_end|> as prefix, and one overlapping its start (never a cut anchor)
    tokenizer["added_tokens"] += [
        {**base, "id": 900, "content": "<|im_end|>!"},
        {**base, "id": 901, "content": "!<|im", "rstrip": True},
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "tokenizer_config.json").write_text((TINY / "tokenizer_config.json").read_text())
    return PromptTokenizer.load(tmp_path)


@pytest.mark.parametrize("flags", [{}, {"rstrip": True}, {"lstrip": True}, {"single_word": True}])
def test_cuts_stay_exact_with_added_token_flags(tmp_path: Path, flags: dict[str, bool]) -> None:
    tok = _with_added(tmp_path, **flags)
    cached = CachedChatEncoder(tok)
    rng = random.Random(7)
    pieces = ["<|im_end|>", "<|im_end|>!", "!", " ", "  ", "\n", "word", "<|im_start|>"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert cached.encode_text(text) == tok.encode(text, add_special_tokens=False), (flags, text)
        follow = text + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        assert cached.encode_text(follow) == tok.encode(follow, add_special_tokens=False), (flags, follow)
