"""Prompt tokenizing: the committed tiny tokenizer, the ChatML template from
tokenizer_config.json, a template file override, the sandbox around templates, named
templates, the special tokens templates see, and OpenAI messages as vLLM converts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_cache.tokenizer import PromptTokenizer, TemplateError, detect_content_format, vllm_conversation

TINY_TOKENIZER = Path(__file__).resolve().parent / "data" / "tiny-tokenizer"
USER = [{"role": "user", "content": "x"}]


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
        PromptTokenizer.load(TINY_TOKENIZER, template).render_chat(USER)
    template.write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        PromptTokenizer.load(TINY_TOKENIZER, template).render_chat(USER)


def test_no_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((TINY_TOKENIZER / "tokenizer.json").read_bytes())
    with pytest.raises(TemplateError, match="chat template"):
        PromptTokenizer.load(tmp_path).render_chat([{"role": "user", "content": "x"}])


def _model_dir(tmp_path: Path, **config: object) -> Path:
    (tmp_path / "tokenizer.json").write_bytes((TINY_TOKENIZER / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_special_tokens_as_transformers_5_passes_them(tmp_path: Path) -> None:
    model = _model_dir(
        tmp_path,
        bos_token=None,
        eos_token={"content": "<|im_end|>", "special": True},
        image_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template="[{{ bos_token }}|{{ eos_token }}|{{ image_token }}|{{ additional_special_tokens }}]",
    )
    tok = PromptTokenizer.load(model)
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "image_token": "<|endoftext|>"}
    assert tok.render_chat(USER) == "[|<|im_end|>|<|endoftext|>|]"
    # chat_template_kwargs win over special tokens and the named arguments
    kwargs = {"eos_token": "E", "add_generation_prompt": False}
    assert tok.render_chat(USER, chat_template_kwargs=kwargs) == "[|E|<|endoftext|>|]"
    with pytest.raises(TemplateError, match="tokenize"):
        tok.render_chat(USER, chat_template_kwargs={"tokenize": True})


def test_named_templates_and_template_files(tmp_path: Path) -> None:
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    tok = PromptTokenizer.load(_model_dir(tmp_path, chat_template=named))
    assert tok.render_chat(USER) == "plain"
    assert tok.render_chat(USER, tools=[{"type": "function"}]) == "tools"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert PromptTokenizer.load(tmp_path).render_chat(USER) == "from file"
    (tmp_path / "chat_template.jinja").unlink()
    tok = PromptTokenizer.load(_model_dir(tmp_path, chat_template=named[1:]))
    with pytest.raises(TemplateError, match="no default"):
        tok.render_chat(USER)


def test_continue_final_message_and_errors() -> None:
    tok = PromptTokenizer.load(TINY_TOKENIZER)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    text = tok.render_chat(chat, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHel")
    with pytest.raises(TemplateError, match="cannot both"):
        tok.render_chat(chat, continue_final_message=True)
    with pytest.raises(TemplateError, match="empty"):
        tok.render_chat([])
    # None values are dropped as transformers does, so templates see them undefined
    assert tok.render_chat([{"role": "user", "content": "a", "name": None}]) == tok.render_chat(
        [{"role": "user", "content": "a"}]
    )


def test_vllm_conversation() -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "bob"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    assert vllm_conversation(messages) == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q", "name": "bob"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    assert vllm_conversation(messages[:1], "openai")[0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]
    with pytest.raises(TemplateError, match="image_url"):
        vllm_conversation([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_content_format_detection() -> None:
    assert detect_content_format("{% for m in messages %}{{ m['content'] }}{% endfor %}") == "string"
    assert (
        detect_content_format(
            "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}"
        )
        == "openai"
    )
    assert (
        detect_content_format(
            "{% set ms = messages %}{% for m in ms %}{% for p in m.content %}{% endfor %}{% endfor %}"
        )
        == "openai"
    )
    assert detect_content_format("{% for p in content %}{% endfor %}") == "openai"


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_long_texts_release_the_gil_and_tokenize_alike(add_special_tokens: bool) -> None:
    """Above ``GIL_RELEASE_CHARS`` ``encode`` goes through ``encode_batch``: same ids."""
    from inference_cache import tokenizer as tokenizer_mod

    tok = PromptTokenizer.load(TINY_TOKENIZER)
    text = "<|im_start|>user\nthe quick brown fox jumps over the lazy dog<|im_end|>\n" * 200
    assert len(text) > tokenizer_mod.GIL_RELEASE_CHARS
    direct = tok.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    assert tok.encode(text, add_special_tokens=add_special_tokens) == direct
