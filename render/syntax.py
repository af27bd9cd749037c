"""The body syntax of a PromptTemplate: literal text with ``{{.slot}}`` placeholders.

Owner: ``inference_cache.render``; the first step of the flow (body → :class:`Template` →
``spec`` checks the slots → ``engine`` renders). The syntax is the subset of Go's
``text/template`` that the original project's samples use, so a body means the same in
both:

* ``{{.name}}`` (spaces or tabs allowed inside the braces: ``{{ .name }}``) is the value of
  slot ``name``; a name is a letter or ``_`` followed by letters, digits or ``_``.
* ``{{"..."}}`` is a quoted literal, written out as is: ``{{"{{"}}`` is how a body says a
  literal ``{{`` (``\\"`` and ``\\\\`` escape a quote and a backslash inside the quotes).
  A lone ``}}`` in text needs no escape.
* Everything else inside ``{{ }}`` (pipelines, functions, ``{{if}}``, comments, the trim
  markers ``{{-``/``-}}``) is rejected with its line and column.

:func:`unparse` writes the canonical body of a :class:`Template`; ``parse(unparse(t)) == t``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from inference_cache.render.errors import TemplateSyntaxError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANK = " \t"


@dataclass(frozen=True, slots=True)
class Text:
    """Literal text, written out as is."""

    value: str


@dataclass(frozen=True, slots=True)
class Slot:
    """A ``{{.name}}`` placeholder; ``line``/``column`` locate it in its body (1-based) and
    take no part in equality."""

    name: str
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


Node = Text | Slot


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed body: text and slots in order, adjacent text merged, no empty text."""

    nodes: tuple[Node, ...]

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(n for n in self.nodes if isinstance(n, Slot))


def _position(body: str, offset: int) -> tuple[int, int]:
    line = body.count("\n", 0, offset) + 1
    return line, offset - (body.rfind("\n", 0, offset) + 1) + 1


def _error(body: str, offset: int, message: str) -> TemplateSyntaxError:
    line, column = _position(body, offset)
    return TemplateSyntaxError(line, column, message)


def _skip_blank(body: str, i: int) -> int:
    while i < len(body) and body[i] in _BLANK:
        i += 1
    return i


def _quoted(body: str, start: int) -> tuple[str, int]:
    """The literal of the quoted string at ``body[start] == '"'`` and the offset after it."""
    out: list[str] = []
    i = start + 1
    while i < len(body):
        c = body[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\n":
            break
        if c == "\\":
            if i + 1 < len(body) and body[i + 1] in '"\\':
                out.append(body[i + 1])
                i += 2
                continue
            raise _error(body, i, 'only \\" and \\\\ may be escaped inside a quoted literal')
        out.append(c)
        i += 1
    raise _error(body, start, "unterminated quoted literal")


def _action(body: str, open_at: int) -> tuple[Node, int]:
    """The node of the action opened at ``open_at`` (``{{``) and the offset after ``}}``."""
    i = open_at + 2
    if body.startswith("-", i) or body.startswith("/*", i):
        what = "trim markers ({{- -}})" if body[i] == "-" else "comments"
        raise _error(body, i, f"{what} are not supported")
    i = _skip_blank(body, i)
    node: Node
    if body.startswith(".", i):
        m = _NAME.match(body, i + 1)
        if m is None:
            raise _error(body, i, "expected a slot name after '.', as in {{.question}}")
        line, column = _position(body, open_at)
        node, i = Slot(m.group(), line, column), m.end()
    elif body.startswith('"', i):
        value, i = _quoted(body, i)
        node = Text(value)
    else:
        close = body.find("}}", i)
        got = body[i:close].strip() if close >= 0 else body[i : i + 20]
        raise _error(
            body,
            i,
            f"unknown placeholder {{{{{got}}}}}: only {{{{.slot}}}} and quoted literals such as "
            '{{"{{"}} are allowed',
        )
    i = _skip_blank(body, i)
    if body.startswith("-}}", i):
        raise _error(body, i, "trim markers ({{- -}}) are not supported")
    if not body.startswith("}}", i):
        raise _error(body, i, "expected '}}' to close the placeholder opened at " + _at(body, open_at))
    return node, i + 2


def _at(body: str, offset: int) -> str:
    line, column = _position(body, offset)
    return f"line {line}, column {column}"


def parse(body: str) -> Template:
    """Parse a body; raises :class:`TemplateSyntaxError` at the first error."""
    nodes: list[Node] = []
    text: list[str] = []
    i = 0
    while True:
        open_at = body.find("{{", i)
        if open_at < 0:
            text.append(body[i:])
            break
        text.append(body[i:open_at])
        node, i = _action(body, open_at)
        if isinstance(node, Text):
            text.append(node.value)
            continue
        if joined := "".join(text):
            nodes.append(Text(joined))
        text = []
        nodes.append(node)
    if joined := "".join(text):
        nodes.append(Text(joined))
    return Template(tuple(nodes))


def _escape(text: str, *, before_action: bool) -> str:
    out = text.replace("{{", '{{"{{"}}')
    # A trailing "{" would join the "{{" of the next action into "{{{".
    if before_action and out.endswith("{"):
        out = out[:-1] + '{{"{"}}'
    return out


def unparse(template: Template) -> str:
    """The canonical body of ``template``: ``{{.name}}`` placeholders, ``{{`` escaped."""
    out: list[str] = []
    for k, node in enumerate(template.nodes):
        if isinstance(node, Slot):
            out.append("{{." + node.name + "}}")
        else:
            out.append(_escape(node.value, before_action=k + 1 < len(template.nodes)))
    return "".join(out)
