"""Prompt tokenizing: the committed tiny tokenizer, the ChatML template from
tokenizer_config.json, a template file override, and the sandbox around templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_cache.fakeengine.tokenize import PromptTokenizer, TemplateError

from .conftest import TINY_TOKENIZER


def test_tiny_tokenizer() -> None:
    tok = PromptTokenizer.load(TINY_TOKENIZER)
    assert tok.vocab_size == 512
    assert tok.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    assert tok.decode(ids) == "The quick brown fox jumps over the lazy dog."
    assert PromptTokenizer.load(TINY_TOKENIZER / "tokenizer.json").encode("fox") == tok.encode("fox")


def test_chatml_template() -> None:
    tok = PromptTokenizer.load(TINY_TOKENIZER)
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:1] == [1]
    closed = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not closed.endswith("assistant\n")


def test_template_file_and_sandbox(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}")
    tok = PromptTokenizer.load(TINY_TOKENIZER, template)
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "[x]<|im_end|>"
    template.write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        PromptTokenizer.load(TINY_TOKENIZER, template).render_chat([])
    template.write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        PromptTokenizer.load(TINY_TOKENIZER, template).render_chat([])


def test_no_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((TINY_TOKENIZER / "tokenizer.json").read_bytes())
    with pytest.raises(TemplateError, match="chat template"):
        PromptTokenizer.load(tmp_path).render_chat([{"role": "user", "content": "x"}])
