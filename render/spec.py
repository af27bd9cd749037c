"""A PromptTemplate's spec as frozen data, decoded strictly from the CRD-shaped dict.

Owner: ``inference_cache.render``. The operator (PromptTemplate watch), ``PUT /templates``
and the serve config's ``templates:`` section all hand the object's ``spec`` to
:meth:`TemplateSpec.from_dict`; everything after (``engine``, ``prefix``) works on the
decoded :class:`TemplateSpec`, whose bodies are already parsed and checked. The shape::

    body: "You are {{.persona}}.\\n\\nQuestion: {{.question}}"   # a text template, or
    messages:                                                    # a chat template
      - {role: system, body: "{{.instructions}}"}
      - {role: user, body: "{{.question}}"}
    slots:
      - {name: instructions, type: Stable, required: true, description: "..."}
      - {name: question, type: Mutable, required: true, maxLength: 4096}
    normalization: collapse            # of Stable values: none (default) | trim | collapse
    allowedNamespaces: [team-a]        # besides the template's own namespace

A slot may set its own ``normalization`` (for any type). Unknown keys, wrong types,
undeclared or unused slots and a Stable slot after the first Mutable one (the stable part
would not be a prefix) are :class:`TemplateSpecError`. :func:`revision` is the content
hash of the canonical spec (the ``status.templateRevision``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from inference_cache.render import syntax
from inference_cache.render.errors import TemplateSpecError, TemplateSyntaxError

ROLES = ("system", "developer", "user", "assistant")
"""The roles a chat template's message may take."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_SPEC_KEYS = frozenset({"body", "messages", "slots", "normalization", "allowedNamespaces"})
_SLOT_KEYS = frozenset({"name", "type", "required", "description", "maxLength", "normalization"})
_MESSAGE_KEYS = frozenset({"role", "body"})
_E = TypeVar("_E", bound=enum.StrEnum)


class SlotType(enum.StrEnum):
    STABLE = "Stable"
    MUTABLE = "Mutable"


class Normalization(enum.StrEnum):
    """How a value is made canonical before it is rendered."""

    NONE = "none"
    """Byte for byte."""
    TRIM = "trim"
    """Leading and trailing whitespace removed."""
    COLLAPSE = "collapse"
    """Trimmed; every whitespace run becomes one ``\\n`` if it holds a line break, else one space."""


@dataclass(frozen=True, slots=True)
class SlotSpec:
    name: str
    type: SlotType
    required: bool = False
    description: str = ""
    max_length: int | None = None
    """At most this many characters (after normalisation)."""
    normalization: Normalization | None = None
    """``None``: the template's normalisation for Stable slots, ``none`` for Mutable ones."""


@dataclass(frozen=True, slots=True)
class MessageSpec:
    role: str
    body: str
    template: syntax.Template = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    """A decoded, checked spec: either ``body`` (a text template) or ``messages``."""

    body: str | None
    messages: tuple[MessageSpec, ...]
    slots: tuple[SlotSpec, ...]
    normalization: Normalization = Normalization.NONE
    allowed_namespaces: tuple[str, ...] = ()
    template: syntax.Template | None = field(default=None, compare=False, repr=False)
    """The parsed ``body`` (text templates)."""

    @property
    def is_chat(self) -> bool:
        return self.body is None

    def slot(self, name: str) -> SlotSpec:
        return next(s for s in self.slots if s.name == name)

    def normalization_of(self, slot: SlotSpec) -> Normalization:
        if slot.normalization is not None:
            return slot.normalization
        return self.normalization if slot.type is SlotType.STABLE else Normalization.NONE

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> TemplateSpec:
        """Decode and check a PromptTemplate ``spec``; raises :class:`TemplateSpecError`."""
        return _decode(spec)

    def to_dict(self) -> dict[str, Any]:
        """The CRD-shaped dict, defaults spelled out; ``from_dict(s.to_dict()) == s``."""
        out: dict[str, Any] = {}
        if self.body is not None:
            out["body"] = self.body
        else:
            out["messages"] = [{"role": m.role, "body": m.body} for m in self.messages]
        slots: list[dict[str, Any]] = []
        for s in self.slots:
            slot: dict[str, Any] = {
                "name": s.name,
                "type": s.type.value,
                "required": s.required,
                "description": s.description,
            }
            if s.max_length is not None:
                slot["maxLength"] = s.max_length
            if s.normalization is not None:
                slot["normalization"] = s.normalization.value
            slots.append(slot)
        out["slots"] = slots
        out["normalization"] = self.normalization.value
        out["allowedNamespaces"] = list(self.allowed_namespaces)
        return out


def revision(spec: TemplateSpec) -> str:
    """The content hash of the canonical spec: 16 hex digits of SHA-256 over its JSON
    (keys sorted, slots by name, namespaces sorted), so a re-ordered but equal spec keeps
    its revision."""
    canonical = spec.to_dict()
    canonical["slots"] = sorted(canonical["slots"], key=lambda s: s["name"])
    canonical["allowedNamespaces"] = sorted(canonical["allowedNamespaces"])
    data = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


# --- strict decoding ---------------------------------------------------------------------------


def _mapping(value: object, path: str, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TemplateSpecError(path, f"expected an object, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise TemplateSpecError(f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(keys))})")
    return value


def _str(value: object, path: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise TemplateSpecError(path, f"expected a string, got {type(value).__name__}")
    if nonempty and not value:
        raise TemplateSpecError(path, "must not be empty")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise TemplateSpecError(path, f"expected a list, got {type(value).__name__}")
    return value


def _enum(kind: type[_E], value: object, path: str) -> _E:
    try:
        return kind(_str(value, path))
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise TemplateSpecError(path, f"must be one of {allowed}, got {value!r}") from None


def _slot(raw: object, path: str) -> SlotSpec:
    d = _mapping(raw, path, _SLOT_KEYS)
    if "name" not in d or "type" not in d:
        raise TemplateSpecError(path, "a slot needs a name and a type")
    name = _str(d["name"], f"{path}.name", nonempty=True)
    if not _NAME.match(name):
        raise TemplateSpecError(f"{path}.name", f"{name!r} is not a slot name (letters, digits, _)")
    required = d.get("required", False)
    if not isinstance(required, bool):
        raise TemplateSpecError(f"{path}.required", "expected true or false")
    max_length = d.get("maxLength")
    if max_length is not None and (type(max_length) is not int or max_length < 1):
        raise TemplateSpecError(f"{path}.maxLength", "expected a positive integer")
    norm = d.get("normalization")
    return SlotSpec(
        name=name,
        type=_enum(SlotType, d["type"], f"{path}.type"),
        required=required,
        description=_str(d.get("description", ""), f"{path}.description"),
        max_length=max_length,
        normalization=None if norm is None else _enum(Normalization, norm, f"{path}.normalization"),
    )


def _parse(body: str, path: str) -> syntax.Template:
    try:
        return syntax.parse(body)
    except TemplateSyntaxError as e:
        raise TemplateSpecError(path, e.message, line=e.line, column=e.column) from e


def _decode(raw: Mapping[str, Any]) -> TemplateSpec:
    d = _mapping(raw, "spec", _SPEC_KEYS)
    if ("body" in d) == ("messages" in d):
        raise TemplateSpecError("spec", "exactly one of body (text) and messages (chat) is required")
    bodies: list[tuple[str, syntax.Template]] = []
    body: str | None = None
    template: syntax.Template | None = None
    messages: list[MessageSpec] = []
    if "body" in d:
        body = _str(d["body"], "spec.body", nonempty=True)
        template = _parse(body, "spec.body")
        bodies.append(("spec.body", template))
    else:
        raw_messages = _list(d["messages"], "spec.messages")
        if not raw_messages:
            raise TemplateSpecError("spec.messages", "must not be empty")
        for i, m in enumerate(raw_messages):
            path = f"spec.messages[{i}]"
            md = _mapping(m, path, _MESSAGE_KEYS)
            if "role" not in md or "body" not in md:
                raise TemplateSpecError(path, "a message needs a role and a body")
            role = _str(md["role"], f"{path}.role")
            if role not in ROLES:
                raise TemplateSpecError(f"{path}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
            text = _str(md["body"], f"{path}.body", nonempty=True)
            parsed = _parse(text, f"{path}.body")
            messages.append(MessageSpec(role, text, parsed))
            bodies.append((f"{path}.body", parsed))
    slots = tuple(_slot(s, f"spec.slots[{i}]") for i, s in enumerate(_list(d.get("slots", []), "spec.slots")))
    seen: set[str] = set()
    for i, s in enumerate(slots):
        if s.name in seen:
            raise TemplateSpecError(f"spec.slots[{i}].name", f"slot {s.name!r} is declared twice")
        seen.add(s.name)
    namespaces = tuple(
        _str(n, f"spec.allowedNamespaces[{i}]")
        for i, n in enumerate(_list(d.get("allowedNamespaces", []), "spec.allowedNamespaces"))
    )
    for i, n in enumerate(namespaces):
        if not _NAMESPACE.match(n):
            raise TemplateSpecError(f"spec.allowedNamespaces[{i}]", f"{n!r} is not a namespace name")
    if len(set(namespaces)) != len(namespaces):
        raise TemplateSpecError("spec.allowedNamespaces", "lists a namespace twice")
    _check_slots(bodies, {s.name: s for s in slots})
    return TemplateSpec(
        body=body,
        messages=tuple(messages),
        slots=slots,
        normalization=_enum(Normalization, d.get("normalization", "none"), "spec.normalization"),
        allowed_namespaces=namespaces,
        template=template,
    )


def _check_slots(bodies: list[tuple[str, syntax.Template]], declared: Mapping[str, SlotSpec]) -> None:
    """Every placeholder is declared, every slot used, and no Stable slot follows the
    first Mutable one in reading order (body, or messages in order)."""
    used: set[str] = set()
    first_mutable: tuple[str, syntax.Slot] | None = None
    for path, template in bodies:
        for node in template.slots:
            slot = declared.get(node.name)
            where = {"line": node.line, "column": node.column}
            if slot is None:
                raise TemplateSpecError(path, f"slot {node.name!r} is not declared in spec.slots", **where)
            used.add(node.name)
            if slot.type is SlotType.MUTABLE and first_mutable is None:
                first_mutable = (path, node)
            elif slot.type is SlotType.STABLE and first_mutable is not None:
                mpath, m = first_mutable
                raise TemplateSpecError(
                    path,
                    f"Stable slot {node.name!r} follows Mutable slot {m.name!r} ({mpath}, line {m.line}, "
                    f"column {m.column}): the stable part must be a prefix of the prompt",
                    **where,
                )
    unused = [name for name in declared if name not in used]
    if unused:
        raise TemplateSpecError("spec.slots", f"slot {unused[0]!r} is declared but not used")
