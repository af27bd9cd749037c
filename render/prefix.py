"""The stable prefix of a template: its text, the tokens every rendering starts with, and
those tokens' block keys in the index.

Owner: ``inference_cache.render``; the last step (spec → values → stable text → tokens →
``index.fingerprint.chain_keys``). The RPC returns the keys (``stable_block_hashes``), the
warm-up pre-fills the stable text, and a router may key a templated request's prefix
before tokenizing the rest.

**The stable text** is the rendering up to the first Mutable slot. For a chat template it
is the model's chat template applied to the messages with a sentinel in the first Mutable
slot, cut at the sentinel (rendered twice with two sentinels; only what both renderings
share before their sentinel counts). A template without a Mutable slot is stable whole.

**The boundary.** Tokenizing the stable text alone is not the same as tokenizing the start
of a full prompt: tokens can straddle the boundary (BPE merges ``Question:`` + ``\\n`` with
whatever follows) and a pre-tokenizer's regex can re-split more than the last pre-token
(Qwen's ``\\s*[\\r\\n]+`` turns ``"x  \\n  "`` + ``"\\n"`` into one pre-token, so the
pre-token before the last changes too). So only tokens that no continuation can change
are kept: the tokens of whole pre-tokens (``Encoding.word_ids``) before the last one, and
before any pre-token whose tokens differ when the text is followed by an adversarial
probe (every pair of characters from letters, digits, whitespace, line breaks,
punctuation, quotes, combining marks, CJK, emoji, plus the rest of every added token the
text ends with the start of). The probes run on a tail window that starts at a pre-token
boundary (checked to tokenize identically, else the whole text is probed). Then only the
full blocks are keyed. ``tests/render`` checks with hypothesis that the keys are a prefix
of the full prompt's keys for random Mutable values, on the Qwen and the tiny tokenizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenizers import Tokenizer

from inference_cache.index import fingerprint
from inference_cache.render import engine
from inference_cache.render.spec import SlotType, TemplateSpec

_WINDOW_WORDS = 64
_SENTINELS = ("\ue000\ue001", "\ue002\ue003")
_PAIRS = ("a", "s", "Z", "é", "中", "1", " ", "\t", "\n", "\r", ".", "'", "!", "\u0301", "😀", "_", "-")
_EXTRA = (
    "",
    "\u1161",  # a Hangul vowel jamo (composes with a leading consonant under NFC)
    "\u200d",
    "re",
    "ll",
    "123",
    "  \n",
    "\n\n\n",
    " \n ",
    "\r\n",
    "...",
    "hello world",
    "\n\nQuestion",
)
PROBES: tuple[str, ...] = (
    *_EXTRA,
    *_PAIRS,
    *("".join(p) for p in itertools.product(_PAIRS, repeat=2)),
)
"""The continuations the boundary is checked against."""


class ChatTokenizer(Protocol):
    """What :func:`stable_prefix` needs of ``inference_cache.tokenizer.PromptTokenizer``."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class StablePrefix:
    text: str
    """The stable text (the rendering up to the first Mutable value)."""
    token_ids: tuple[int, ...]
    """The tokens every rendering's tokenization starts with (may end mid-block)."""
    block_keys: tuple[bytes, ...]
    """``chain_keys`` of the full blocks of ``token_ids``: the leading keys of every rendering."""
    block_size: int

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    @property
    def last_key(self) -> bytes:
        """The key of the last full stable block (``stable_prefix_hash``); empty if none."""
        return self.block_keys[-1] if self.block_keys else b""


def stable_prefix(
    spec: TemplateSpec,
    tokenizer: ChatTokenizer,
    block_size: int,
    *,
    variables: Mapping[str, object] | None = None,
    salt: str | None = None,
    max_value_bytes: int | None = None,
    add_special_tokens: bool | None = None,
) -> StablePrefix:
    """The stable prefix of ``spec`` for the Stable ``variables`` (Mutable ones are
    ignored; a missing required Stable slot is a ``RenderError``). ``add_special_tokens``
    defaults to the request path's rule: ``True`` for a text template (``/v1/completions``),
    ``False`` for a chat (the chat template writes them). ``salt`` is the request's
    ``cache_salt``. Raises ``RenderError``, and the tokenizer's ``TemplateError`` for a chat
    the model's template cannot render."""
    values = engine.check_values(spec, variables or {}, max_value_bytes=max_value_bytes, stable_only=True)
    if spec.template is not None:
        text, open_end = engine.stable_text(spec, values)
        special = True if add_special_tokens is None else add_special_tokens
    else:
        text, open_end = _chat_stable_text(spec, tokenizer, values)
        special = False if add_special_tokens is None else add_special_tokens
    tok = tokenizer.tokenizer
    ids = safe_prefix_ids(tok, text, add_special_tokens=special) if open_end else _all_ids(tok, text, special)
    keys = fingerprint.chain_keys(ids, block_size, salt=salt)
    return StablePrefix(text, tuple(ids), tuple(keys), block_size)


def _all_ids(tok: Tokenizer, text: str, special: bool) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=special).ids
    return ids


def _chat_stable_text(
    spec: TemplateSpec, tokenizer: ChatTokenizer, values: Mapping[str, str]
) -> tuple[str, bool]:
    mutable = {s.name for s in spec.slots if s.type is SlotType.MUTABLE}
    renderings: list[tuple[str, int]] = []
    for sentinel in _SENTINELS:
        filled = {**values, **dict.fromkeys(mutable, sentinel)}
        chat = [{"role": m.role, "content": engine.fill(m.template, filled)} for m in spec.messages]
        text = tokenizer.render_chat(chat, add_generation_prompt=True)
        renderings.append((text, text.find(sentinel)))
    (a, cut_a), (b, cut_b) = renderings
    if cut_a < 0 and cut_b < 0 and a == b:
        return a, False  # no Mutable value reaches the prompt: the whole chat is stable
    shared = _common_len(a, b)
    cut = min(shared, *(c for c in (cut_a, cut_b) if c >= 0))
    return a[:cut], True


def _common_len(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the common leading run of two sequences (strings or token ids)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _probes_for(tok: Tokenizer, text: str) -> list[str]:
    """``PROBES`` plus the rest of every added token whose start the text ends with."""
    extra = []
    for added in tok.get_added_tokens_decoder().values():
        content = added.content
        for k in range(1, len(content)):
            if text.endswith(content[:k]):
                extra.append(content[k:])
    return [*PROBES, *extra]


def safe_prefix_ids(tok: Tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    """The leading ids of ``tok.encode(text + t)`` that are the same for every ``t``: the
    post-processor's leading specials, then the tokens of whole pre-tokens up to the
    boundary described in the module docstring."""
    enc = tok.encode(text, add_special_tokens=add_special_tokens)
    ids: list[int] = enc.ids
    lead = 0
    while lead < len(ids) and enc.special_tokens_mask[lead]:
        lead += 1
    end = lead
    while end < len(ids) and not enc.special_tokens_mask[end]:
        end += 1
    if end == lead:
        return ids[:lead]
    starts = [i for i in range(lead, end) if i == lead or enc.word_ids[i] != enc.word_ids[i - 1]]
    for w in dict.fromkeys((starts[max(0, len(starts) - _WINDOW_WORDS)], lead)):
        for at in _window_starts(enc.offsets, w, lead):
            kept = _probe(tok, text[at:], ids[w:end])
            if kept is not None and (kept > 0 or w == lead):
                return ids[: w + kept]
    return ids[:lead]


def _window_starts(offsets: Sequence[tuple[int, int]], w: int, lead: int) -> list[int]:
    if w == lead:
        return [0]
    return list(dict.fromkeys((offsets[w - 1][1], offsets[w][0])))


def _probe(tok: Tokenizer, window: str, expected: Sequence[int]) -> int | None:
    """How many ids of ``window`` (whole pre-tokens, never the last) survive every probe;
    ``None`` if ``window`` does not tokenize to ``expected`` (not a clean cut)."""
    base = tok.encode(window, add_special_tokens=False)
    if base.ids != list(expected):
        return None
    words = base.word_ids
    starts = [i for i in range(len(words)) if i == 0 or words[i] != words[i - 1]]
    keep = starts[-1]  # never the last pre-token
    for probed in tok.encode_batch([window + p for p in _probes_for(tok, window)], add_special_tokens=False):
        keep = min(keep, _common_len(base.ids, probed.ids))
    return max(s for s in starts if s <= keep)
