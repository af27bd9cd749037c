"""The errors of the prompt-template engine, one hierarchy for every stage.

Owner: ``inference_cache.render``. Parsing raises :class:`TemplateSyntaxError` (a position
in one body), decoding a PromptTemplate spec raises :class:`TemplateSpecError` (a path in
the spec, and the position when a body is at fault), rendering raises :class:`RenderError`
(a kind and a slot). The wiring translates them once: the operator writes
``TemplateError.message`` into the ``Invalid`` condition, the RPC answers ``RENDER_ERROR``,
ext_proc answers a 4xx in the OpenAI error shape.
"""

from __future__ import annotations

from typing import Literal

RenderErrorKind = Literal["missing_required", "unknown_variable", "oversize", "invalid_value"]


class TemplateError(ValueError):
    """Base class: ``str(error)`` is a complete, user-facing sentence."""


class TemplateSyntaxError(TemplateError):
    """A template body does not parse; ``line`` and ``column`` are 1-based."""

    def __init__(self, line: int, column: int, message: str) -> None:
        self.line = line
        self.column = column
        self.message = message
        super().__init__(f"line {line}, column {column}: {message}")


class TemplateSpecError(TemplateError):
    """A PromptTemplate spec is invalid at ``path`` (``spec.slots[1].type``); a body's
    parse or slot errors also carry ``line``/``column``."""

    def __init__(
        self, path: str, message: str, *, line: int | None = None, column: int | None = None
    ) -> None:
        self.path = path
        self.message = message
        self.line = line
        self.column = column
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{path}{where}: {message}")


class RenderError(TemplateError):
    """The variables do not fit the template: ``kind`` says how, ``slot`` names the
    variable (a slot name, or the unknown variable's name)."""

    def __init__(self, kind: RenderErrorKind, slot: str, message: str) -> None:
        self.kind: RenderErrorKind = kind
        self.slot = slot
        self.message = message
        super().__init__(f"{slot}: {message}")
