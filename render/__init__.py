"""The prompt-template engine: PromptTemplate stable/mutable slots to stable cache keys.

Owner: the server's RenderTemplate RPC, the ext_proc template path, ``PUT /templates`` and
the operator's PromptTemplate status. The flow: ``TemplateSpec.from_dict`` (strict decoding,
``syntax.parse`` of every body, slot checks) → ``render`` (variables → prompt text or chat
messages) → ``stable_prefix`` (stable text → boundary-safe tokens → the index's block keys).
No gRPC, no Kubernetes: the only other ``inference_cache`` module used is the pure
``index.fingerprint`` (the key function); the tokenizer is passed in (``ChatTokenizer``,
satisfied by ``inference_cache.tokenizer.PromptTokenizer``). See ``docs/templates.md``.
"""

from inference_cache.render.engine import ChatMessage, Rendered, render
from inference_cache.render.errors import (
    RenderError,
    TemplateError,
    TemplateSpecError,
    TemplateSyntaxError,
)
from inference_cache.render.prefix import ChatTokenizer, StablePrefix, stable_prefix
from inference_cache.render.spec import (
    MessageSpec,
    Normalization,
    SlotSpec,
    SlotType,
    TemplateSpec,
    revision,
)
from inference_cache.render.syntax import Template, parse, unparse

__all__ = [
    "ChatMessage",
    "ChatTokenizer",
    "MessageSpec",
    "Normalization",
    "RenderError",
    "Rendered",
    "SlotSpec",
    "SlotType",
    "StablePrefix",
    "Template",
    "TemplateError",
    "TemplateSpec",
    "TemplateSpecError",
    "TemplateSyntaxError",
    "parse",
    "render",
    "revision",
    "stable_prefix",
    "unparse",
]
