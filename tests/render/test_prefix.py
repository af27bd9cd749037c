"""``render.prefix``: the stable prefix's tokens and block keys are exactly the leading
ones of every full rendering, on real tokenizers (Qwen BPE, the tiny test tokenizer).

What is tested: the boundary rule against adversarial and random (hypothesis) Mutable
values for text and chat templates, salts, templates without a Mutable slot. Nothing is
faked; the oracle is the production tokenizer on the full prompt and ``chain_keys``."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_cache.index.fingerprint import chain_keys
from inference_cache.render import RenderError, TemplateSpec, render, stable_prefix
from inference_cache.render.prefix import safe_prefix_ids
from inference_cache.tokenizer import PromptTokenizer

TEXT = TemplateSpec.from_dict(
    {
        "body": "{{.system}}\n\nQuestion: {{.question}}\nAnswer:",
        "slots": [
            {"name": "system", "type": "Stable", "required": True},
            {"name": "question", "type": "Mutable", "required": True},
        ],
    }
)
ADJACENT = TemplateSpec.from_dict(
    {
        "body": "{{.system}}{{.question}}",
        "slots": [{"name": "system", "type": "Stable"}, {"name": "question", "type": "Mutable"}],
    }
)
"""The Mutable value follows the Stable one directly: the boundary is random text."""
CHAT = TemplateSpec.from_dict(
    {
        "messages": [
            {"role": "system", "body": "{{.system}}"},
            {"role": "user", "body": "Document:\n{{.doc}}{{.question}}"},
        ],
        "slots": [
            {"name": "system", "type": "Stable", "required": True},
            {"name": "doc", "type": "Stable"},
            {"name": "question", "type": "Mutable"},
        ],
    }
)
SYSTEM = "You are a careful assistant. Answer in one sentence, cite the document. " * 3

#: Characters that make tokens straddle or re-split: whitespace runs and line breaks,
#: punctuation, apostrophes (contractions), digits, combining marks, CJK, emoji and the
#: pieces of added tokens.
_ADVERSARIAL = st.lists(
    st.sampled_from(
        [
            " ",
            "  ",
            "\n",
            "\r\n",
            "\t",
            "x",
            "s",
            "'",
            "'s",
            ".",
            "!",
            "?",
            ":",
            "1",
            "42",
            "é",
            "\u0301",
            "中",
            "😀",
            "_",
            "-",
            "<|im_",
            "end|>",
            "  \n  ",
            "<|im_end|>",
            "<|im_start|>",
            "<",
            "|",
            "ll",
            " the",
            "ing",
        ]
    ),
    max_size=12,
).map("".join)
values = _ADVERSARIAL | st.text(max_size=30)


def _full_ids(tok: PromptTokenizer, spec: TemplateSpec, variables: Mapping[str, str]) -> list[int]:
    r = render(spec, variables)
    if r.text is not None:
        return tok.encode(r.text, add_special_tokens=True)
    assert r.messages is not None
    return tok.encode_chat([m.to_openai() for m in r.messages])


def _assert_prefix_of_every_rendering(
    tok: PromptTokenizer, spec: TemplateSpec, stable: dict[str, str], mutables: list[str], block_size: int
) -> None:
    sp = stable_prefix(spec, tok, block_size, variables=stable)
    assert len(sp.block_keys) == sp.token_count // block_size
    for question in mutables:
        full = _full_ids(tok, spec, {**stable, "question": question})
        assert full[: sp.token_count] == list(sp.token_ids), (stable, question)
        assert chain_keys(full, block_size)[: len(sp.block_keys)] == list(sp.block_keys)


def test_qwen_regex_can_change_the_pre_token_before_the_last(qwen: PromptTokenizer) -> None:
    """``\\s*[\\r\\n]+`` re-splits ``"  \\n"`` when a line break follows: dropping only the
    last pre-token (``"  "``) would keep a token the full prompt does not have."""
    tok = qwen
    stable = "x  \n  "
    naive = tok.encode(stable, add_special_tokens=False)[:-1]
    assert tok.encode(stable + "\n", add_special_tokens=False)[: len(naive)] != naive
    assert safe_prefix_ids(tok.tokenizer, stable, add_special_tokens=False) == tok.encode(
        "x", add_special_tokens=False
    )


@pytest.mark.parametrize(
    ("stable", "continuation"),
    [
        pytest.param("Question:", ":", id="punctuation-run"),
        pytest.param("Question: ", "why", id="space-joins-word"),
        pytest.param("the cat", "s", id="word-continues"),
        pytest.param("it", "'s", id="contraction"),
        pytest.param("cafe", "\u0301", id="combining-mark-nfc"),
        pytest.param("end <|im_", "end|>", id="added-token-completed"),
        pytest.param("a\n\n", "\n", id="line-break-run"),
        pytest.param("1", "2", id="digits"),
        pytest.param("", "x", id="empty"),
    ],
)
def test_boundary_cases(tokenizer: PromptTokenizer, stable: str, continuation: str) -> None:
    for special in (False, True):
        safe = safe_prefix_ids(tokenizer.tokenizer, stable, add_special_tokens=special)
        full = tokenizer.encode(stable + continuation, add_special_tokens=special)
        assert full[: len(safe)] == safe


def test_tokens_after_the_last_added_token_are_kept_when_safe(tokenizer: PromptTokenizer) -> None:
    """The boundary is not needlessly early: a chat's stable prefix keeps the user turn's
    header and the literal text before the Mutable slot, minus its last pre-token."""
    sp = stable_prefix(CHAT, tokenizer, 1, variables={"system": SYSTEM, "doc": "Cats purr. Question: "})
    assert sp.text.endswith("<|im_start|>user\nDocument:\nCats purr. Question: ")
    assert tokenizer.decode(sp.token_ids).endswith("Cats purr. Question:")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    system=values, mutables=st.lists(values, min_size=1, max_size=4), block_size=st.sampled_from([1, 4, 16])
)
def test_text_stable_keys_lead_every_rendering(
    tokenizer: PromptTokenizer, block_size: int, system: str, mutables: list[str]
) -> None:
    _assert_prefix_of_every_rendering(tokenizer, ADJACENT, {"system": SYSTEM + system}, mutables, block_size)
    _assert_prefix_of_every_rendering(tokenizer, TEXT, {"system": system}, mutables, block_size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=values, mutables=st.lists(values, min_size=1, max_size=4), block_size=st.sampled_from([1, 4, 16]))
def test_chat_stable_keys_lead_every_rendering(
    tokenizer: PromptTokenizer, block_size: int, doc: str, mutables: list[str]
) -> None:
    _assert_prefix_of_every_rendering(tokenizer, CHAT, {"system": SYSTEM, "doc": doc}, mutables, block_size)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=values, b=values)
def test_two_renderings_share_the_stable_blocks(tokenizer: PromptTokenizer, a: str, b: str) -> None:
    stable = {"system": SYSTEM}
    sp = stable_prefix(TEXT, tokenizer, 4, variables=stable)
    assert sp.block_keys, "the stable text spans several blocks"
    keys_a = chain_keys(_full_ids(tokenizer, TEXT, {**stable, "question": a}), 4)
    keys_b = chain_keys(_full_ids(tokenizer, TEXT, {**stable, "question": b}), 4)
    n = len(sp.block_keys)
    assert keys_a[:n] == keys_b[:n] == list(sp.block_keys)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=values)
def test_deterministic(tokenizer: PromptTokenizer, system: str) -> None:
    first = stable_prefix(TEXT, tokenizer, 4, variables={"system": system})
    assert stable_prefix(TEXT, tokenizer, 4, variables={"system": system}) == first


def test_salt_starts_a_salted_chain(tokenizer: PromptTokenizer) -> None:
    stable = {"system": SYSTEM}
    plain = stable_prefix(TEXT, tokenizer, 4, variables=stable)
    salted = stable_prefix(TEXT, tokenizer, 4, variables=stable, salt="tenant-a")
    full = _full_ids(tokenizer, TEXT, {**stable, "question": "why?"})
    assert list(salted.block_keys) == chain_keys(full, 4, salt="tenant-a")[: len(salted.block_keys)]
    assert salted.token_ids == plain.token_ids
    assert not set(salted.block_keys) & set(plain.block_keys)


@pytest.mark.parametrize("spec_dict", [
    pytest.param({"body": "{{.s}} and more", "slots": [{"name": "s", "type": "Stable"}]}, id="text"),
    pytest.param({"messages": [{"role": "system", "body": "{{.s}}"}, {"role": "user", "body": "Hi"}],
                  "slots": [{"name": "s", "type": "Stable"}]}, id="chat"),
])  # fmt: skip
def test_without_a_mutable_slot_the_whole_prompt_is_stable(
    tokenizer: PromptTokenizer, spec_dict: dict[str, object]
) -> None:
    spec = TemplateSpec.from_dict(spec_dict)
    sp = stable_prefix(spec, tokenizer, 2, variables={"s": SYSTEM})
    full = _full_ids(tokenizer, spec, {"s": SYSTEM})
    assert list(sp.token_ids) == full
    assert list(sp.block_keys) == chain_keys(full, 2)


def test_last_key_and_short_prefixes(tokenizer: PromptTokenizer) -> None:
    sp = stable_prefix(TEXT, tokenizer, 4, variables={"system": SYSTEM})
    assert sp.last_key == sp.block_keys[-1]
    short = stable_prefix(TEXT, tokenizer, 10_000, variables={"system": "Hi"})
    assert short.block_keys == () and short.last_key == b""
    assert short.token_count > 0


def test_stable_values_are_checked_and_mutable_ones_ignored(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(RenderError) as info:
        stable_prefix(TEXT, tokenizer, 4, variables={})
    assert (info.value.kind, info.value.slot) == ("missing_required", "system")
    with_question = stable_prefix(TEXT, tokenizer, 4, variables={"system": SYSTEM, "question": "x"})
    assert with_question == stable_prefix(TEXT, tokenizer, 4, variables={"system": SYSTEM})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stable=values, continuations=st.lists(values, min_size=1, max_size=8), special=st.booleans())
def test_safe_ids_survive_any_continuation(
    tokenizer: PromptTokenizer, stable: str, continuations: list[str], special: bool
) -> None:
    safe = safe_prefix_ids(tokenizer.tokenizer, stable, add_special_tokens=special)
    for continuation in continuations:
        assert tokenizer.encode(stable + continuation, add_special_tokens=special)[: len(safe)] == safe
