"""``render.engine``: variables to text or chat messages, canonical normalisation, the
typed errors, determinism."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference_cache.render import ChatMessage, Normalization, RenderError, TemplateSpec, render
from inference_cache.render.engine import normalize

TEXT = TemplateSpec.from_dict(
    {
        "body": "You are {{.persona}}.\n{{.doc}}\nQuestion: {{.question}}",
        "slots": [
            {"name": "persona", "type": "Stable", "required": True, "maxLength": 40},
            {"name": "doc", "type": "Stable"},
            {"name": "question", "type": "Mutable", "required": True},
        ],
        "normalization": "collapse",
    }
)


def test_text() -> None:
    r = render(TEXT, {"persona": "  a   helpful\tassistant ", "question": "  why?  "})
    assert r.text == "You are a helpful assistant.\n\nQuestion:   why?  "
    assert r.messages is None
    assert dict(r.values) == {"persona": "a helpful assistant", "doc": "", "question": "  why?  "}


def test_chat() -> None:
    spec = TemplateSpec.from_dict(
        {
            "messages": [{"role": "system", "body": "{{.rules}}"}, {"role": "user", "body": "Q: {{.q}}"}],
            "slots": [
                {"name": "rules", "type": "Stable", "normalization": "trim"},
                {"name": "q", "type": "Mutable"},
            ],
        }
    )
    r = render(spec, {"rules": " Be brief. ", "q": "hi"})
    assert r.text is None
    assert r.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "Q: hi"))
    assert [m.to_openai() for m in r.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: hi"},
    ]


@pytest.mark.parametrize(
    ("how", "value", "expected"),
    [
        (Normalization.NONE, " a \n b ", " a \n b "),
        (Normalization.TRIM, " \ta \n b\n ", "a \n b"),
        (Normalization.COLLAPSE, " a  \t b \n\n  c\r\nd ", "a b\nc\nd"),
    ],
)
def test_normalize(how: Normalization, value: str, expected: str) -> None:
    assert normalize(value, how) == expected


@pytest.mark.parametrize(
    ("variables", "kind", "slot"),
    [
        pytest.param({"question": "q"}, "missing_required", "persona", id="missing"),
        pytest.param({"persona": "p", "question": "q", "zzz": "x", "aaa": "y"}, "unknown_variable", "aaa",
                     id="unknown-first-sorted"),
        pytest.param({"persona": "p" * 41, "question": "q"}, "oversize", "persona", id="max-length"),
        pytest.param({"persona": "p", "question": "é" * 6}, "oversize", "question", id="max-bytes"),
        pytest.param({"persona": "p", "question": 3}, "invalid_value", "question", id="not-a-string"),
    ],
)  # fmt: skip
def test_errors(variables: dict[str, object], kind: str, slot: str) -> None:
    with pytest.raises(RenderError) as info:
        render(TEXT, variables, max_value_bytes=10)
    assert (info.value.kind, info.value.slot) == (kind, slot)


def test_max_length_counts_after_normalisation() -> None:
    r = render(TEXT, {"persona": " " * 100 + "p", "question": "q"})
    assert r.values["persona"] == "p"


@given(persona=st.text(max_size=40), doc=st.text(), question=st.text())
def test_deterministic_and_canonical(persona: str, doc: str, question: str) -> None:
    variables = {"persona": persona, "doc": doc, "question": question}
    try:
        first = render(TEXT, variables)
    except RenderError as e:
        assert e.kind == "oversize"
        return
    assert render(TEXT, dict(reversed(variables.items()))) == first
    # Equal after normalisation renders byte-identically.
    assert render(TEXT, {**variables, "doc": f"  {doc}\t"}).text == first.text
