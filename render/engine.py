"""Rendering: a decoded template and request variables to the prompt for the engine.

Owner: ``inference_cache.render``; after ``spec`` (decoding) and before ``prefix`` (keys).
The RPC and ext_proc call :func:`render` per request: a text template becomes the
``prompt`` of ``/v1/completions``, a chat template the ``messages`` of
``/v1/chat/completions``. Values are made canonical first (``Normalization``), so equal
inputs render byte-identically; a value is inserted verbatim otherwise (no escaping: the
prompt is text, not markup). Deterministic and pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from inference_cache.render import syntax
from inference_cache.render.errors import RenderError
from inference_cache.render.spec import Normalization, SlotType, TemplateSpec

_RUN = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    def to_openai(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class Rendered:
    """One rendering: ``text`` for a text template, ``messages`` for a chat template."""

    text: str | None
    messages: tuple[ChatMessage, ...] | None
    values: Mapping[str, str]
    """The normalised value of every slot (``""`` for an absent optional one)."""


def normalize(value: str, how: Normalization) -> str:
    if how is Normalization.NONE:
        return value
    value = value.strip()
    if how is Normalization.TRIM:
        return value
    return _RUN.sub(lambda m: "\n" if ("\n" in m.group() or "\r" in m.group()) else " ", value)


def check_values(
    spec: TemplateSpec,
    variables: Mapping[str, object],
    *,
    max_value_bytes: int | None = None,
    stable_only: bool = False,
) -> dict[str, str]:
    """The normalised value of every slot (only the Stable ones with ``stable_only``, which
    ignores Mutable variables); raises :class:`RenderError` for an unknown variable, a
    missing required slot, a value that is not a string or is too long."""
    declared = {s.name for s in spec.slots}
    unknown = sorted(name for name in variables if name not in declared)
    if unknown:
        raise RenderError("unknown_variable", unknown[0], "the template declares no such slot")
    values: dict[str, str] = {}
    for slot in spec.slots:
        if stable_only and slot.type is SlotType.MUTABLE:
            continue
        raw = variables.get(slot.name)
        if raw is None:
            if slot.required:
                raise RenderError("missing_required", slot.name, "a required slot has no value")
            values[slot.name] = ""
            continue
        if not isinstance(raw, str):
            raise RenderError("invalid_value", slot.name, f"expected a string, got {type(raw).__name__}")
        if max_value_bytes is not None and len(raw.encode("utf-8", "surrogatepass")) > max_value_bytes:
            raise RenderError("oversize", slot.name, f"the value is over {max_value_bytes} bytes")
        value = normalize(raw, spec.normalization_of(slot))
        if slot.max_length is not None and len(value) > slot.max_length:
            raise RenderError(
                "oversize",
                slot.name,
                f"the value is {len(value)} characters, over maxLength {slot.max_length}",
            )
        values[slot.name] = value
    return values


def fill(template: syntax.Template, values: Mapping[str, str]) -> str:
    """``template`` with every slot replaced by its value."""
    return "".join(n.value if isinstance(n, syntax.Text) else values[n.name] for n in template.nodes)


def render(
    spec: TemplateSpec, variables: Mapping[str, object], *, max_value_bytes: int | None = None
) -> Rendered:
    """Render ``spec`` with ``variables`` (slot name → string); raises :class:`RenderError`."""
    values = check_values(spec, variables, max_value_bytes=max_value_bytes)
    frozen = MappingProxyType(values)
    if spec.template is not None:
        return Rendered(fill(spec.template, values), None, frozen)
    messages = tuple(ChatMessage(m.role, fill(m.template, values)) for m in spec.messages)
    return Rendered(None, messages, frozen)


def stable_text(spec: TemplateSpec, values: Mapping[str, str]) -> tuple[str, bool]:
    """A text template's rendering up to its first Mutable slot, and whether it has one
    (without, the whole rendering is stable). Only Stable ``values`` are read."""
    assert spec.template is not None, "chat templates: prefix.stable_prefix renders the chat"
    out: list[str] = []
    for node in spec.template.nodes:
        if isinstance(node, syntax.Text):
            out.append(node.value)
        elif spec.slot(node.name).type is SlotType.MUTABLE:
            return "".join(out), True
        else:
            out.append(values[node.name])
    return "".join(out), False
