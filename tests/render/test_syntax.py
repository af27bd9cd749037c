"""``render.syntax``: the ``{{.slot}}`` body syntax, its errors (line and column) and the
canonical round trip ``parse(unparse(t)) == t``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference_cache.render import TemplateSyntaxError, parse, unparse
from inference_cache.render.syntax import Slot, Template, Text


def test_text_and_slots() -> None:
    t = parse("You are {{.persona}}.\n\nQ: {{ .question }}")
    assert t.nodes == (Text("You are "), Slot("persona"), Text(".\n\nQ: "), Slot("question"))
    assert [(s.name, s.line, s.column) for s in t.slots] == [("persona", 1, 9), ("question", 3, 4)]


@pytest.mark.parametrize(
    ("body", "nodes"),
    [
        pytest.param('a{{"{{"}}b', (Text("a{{b"),), id="escaped-open"),
        pytest.param("a}}b", (Text("a}}b"),), id="lone-close"),
        pytest.param('{{"say \\"hi\\" \\\\"}}', (Text('say "hi" \\'),), id="quoted-escapes"),
        pytest.param('{{"}}"}}', (Text("}}"),), id="close-inside-quotes"),
        pytest.param("{{\t.x\t}}", (Slot("x"),), id="tabs"),
        pytest.param("", (), id="empty"),
    ],
)
def test_literals(body: str, nodes: tuple[Text | Slot, ...]) -> None:
    assert parse(body).nodes == nodes


@pytest.mark.parametrize(
    ("body", "line", "column", "message"),
    [
        pytest.param("hello {{user}}", 1, 9, "unknown placeholder {{user}}", id="no-dot"),
        pytest.param("a\nb {{ if .x }}", 2, 6, "unknown placeholder {{if .x}}", id="go-if"),
        pytest.param("{{.a.b}}", 1, 5, "expected '}}'", id="field-chain"),
        pytest.param("{{.x | upper}}", 1, 6, "expected '}}'", id="pipeline"),
        pytest.param("x\n\n  {{.name", 3, 10, "expected '}}'", id="unclosed"),
        pytest.param("{{- .x}}", 1, 3, "trim markers", id="trim-left"),
        pytest.param("{{.x -}}", 1, 6, "trim markers", id="trim-right"),
        pytest.param("{{/* c */}}", 1, 3, "comments", id="comment"),
        pytest.param("{{.}}", 1, 3, "expected a slot name", id="dot-only"),
        pytest.param("{{.1x}}", 1, 3, "expected a slot name", id="digit-name"),
        pytest.param('ab{{"x}}', 1, 5, "unterminated quoted literal", id="unterminated-quote"),
        pytest.param('{{"\\n"}}', 1, 4, "may be escaped", id="bad-escape"),
        pytest.param("é\n😀 {{", 2, 5, "unknown placeholder", id="columns-count-characters"),
    ],
)
def test_errors_have_line_and_column(body: str, line: int, column: int, message: str) -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        parse(body)
    assert (info.value.line, info.value.column) == (line, column)
    assert message in info.value.message
    assert str(info.value).startswith(f"line {line}, column {column}: ")


def test_unparse_is_canonical() -> None:
    assert unparse(parse("{{ .a }}x{{.b}}")) == "{{.a}}x{{.b}}"
    assert unparse(parse('{{"{{"}}{{.a}}')) == '{{"{{"}}{{.a}}'
    # A text ending in "{" before a placeholder must not fuse into "{{{".
    assert unparse(Template((Text("a{"), Slot("b")))) == 'a{{"{"}}{{.b}}'


_FIRST = "abcxyzABCXYZ_"
_names = st.builds(
    lambda a, b: a + b, st.sampled_from(_FIRST), st.text(alphabet=_FIRST + "0123456789", max_size=8)
)
_TRICKY = ["{", "}", '"', "\\", ".", " ", "\n", "a", "é"]
_texts = st.text(alphabet=st.sampled_from(_TRICKY), min_size=1) | st.text(min_size=1)


@st.composite
def templates(draw: st.DrawFn) -> Template:
    """Normalised templates: text and slots alternate, no empty text."""
    nodes: list[Text | Slot] = []
    for _ in range(draw(st.integers(0, 6))):
        if (nodes and isinstance(nodes[-1], Text)) or draw(st.booleans()):
            nodes.append(Slot(draw(_names)))
        else:
            nodes.append(Text(draw(_texts)))
    return Template(tuple(nodes))


@given(templates())
def test_round_trip(t: Template) -> None:
    assert parse(unparse(t)) == t


@given(st.text())
def test_parse_total(body: str) -> None:
    """Any text parses or raises a positioned syntax error, never anything else; what
    parses re-parses identically from its canonical form."""
    try:
        t = parse(body)
    except TemplateSyntaxError as e:
        assert e.line >= 1 and e.column >= 1
    else:
        assert parse(unparse(t)) == t
