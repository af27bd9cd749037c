"""Prompts to token ids the way vLLM's OpenAI server makes them.

Owner: ``inference_cache.fakeengine``; ``app`` turns every request into token ids here
before the engine sees it. A Hugging Face ``tokenizer.json`` (``tokenizers``) does the
tokenizing; chat messages go through the model's Jinja chat template in a sandboxed
environment (as ``transformers`` renders it: ``trim_blocks``, ``lstrip_blocks``,
``raise_exception``, ``tojson``) with ``add_generation_prompt=True``. Completions add special
tokens, rendered chats do not (the template has them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


class TemplateError(ValueError):
    """The chat template refused the messages or is missing."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _special(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # AddedToken form
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class PromptTokenizer:
    tokenizer: Tokenizer
    chat_template: jinja2.Template | None
    template_vars: Mapping[str, str | None]

    @classmethod
    def load(cls, path: Path, chat_template: Path | None = None) -> PromptTokenizer:
        """``path`` is a directory with ``tokenizer.json`` (+ ``tokenizer_config.json``) or a
        ``tokenizer.json`` file; ``chat_template`` overrides the config's template."""
        file = path / "tokenizer.json" if path.is_dir() else path
        config_file = file.parent / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        source = chat_template.read_text() if chat_template else config.get("chat_template")
        if isinstance(source, list):  # named templates: take "default"
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        template = env.from_string(source) if isinstance(source, str) else None
        specials = {k: _special(config, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(Tokenizer.from_file(str(file)), template, specials)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) or "" for i in ids]

    @property
    def vocab_size(self) -> int:
        size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return size

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        if self.chat_template is None:
            raise TemplateError("the tokenizer has no chat template; pass --chat-template")
        try:
            return self.chat_template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tools=tools,
                **self.template_vars,
                **(chat_template_kwargs or {}),
            )
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from e

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)
