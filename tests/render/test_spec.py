"""``render.spec``: strict decoding of the PromptTemplate ``spec`` (paths in errors, body
positions), the slot rules, ``to_dict`` round trip and ``revision``."""

from __future__ import annotations

from typing import Any

import pytest

from inference_cache.render import Normalization, SlotType, TemplateSpec, TemplateSpecError, revision

BASE: dict[str, Any] = {
    "body": "You are {{.persona}}.\nQuestion: {{.question}}",
    "slots": [
        {"name": "persona", "type": "Stable", "required": True, "description": "who answers"},
        {"name": "question", "type": "Mutable", "required": True, "maxLength": 200},
    ],
    "normalization": "collapse",
    "allowedNamespaces": ["team-a"],
}


def with_(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def test_decodes_the_crd_shape() -> None:
    spec = TemplateSpec.from_dict(BASE)
    assert not spec.is_chat
    assert [(s.name, s.type, s.required, s.max_length) for s in spec.slots] == [
        ("persona", SlotType.STABLE, True, None),
        ("question", SlotType.MUTABLE, True, 200),
    ]
    assert spec.normalization is Normalization.COLLAPSE
    assert spec.allowed_namespaces == ("team-a",)
    assert spec.normalization_of(spec.slot("persona")) is Normalization.COLLAPSE
    assert spec.normalization_of(spec.slot("question")) is Normalization.NONE


def test_chat_template() -> None:
    spec = TemplateSpec.from_dict(
        {
            "messages": [{"role": "system", "body": "{{.rules}}"}, {"role": "user", "body": "Q: {{.q}}"}],
            "slots": [{"name": "rules", "type": "Stable"}, {"name": "q", "type": "Mutable"}],
        }
    )
    assert spec.is_chat and [m.role for m in spec.messages] == ["system", "user"]
    assert spec.template is None


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        pytest.param([], "spec", "expected an object", id="not-an-object"),
        pytest.param(with_(extra=1), "spec.extra", "unknown field", id="unknown-field"),
        pytest.param({"slots": []}, "spec", "exactly one of body", id="no-body"),
        pytest.param(with_(messages=[]), "spec", "exactly one of body", id="body-and-messages"),
        pytest.param(with_(body=""), "spec.body", "must not be empty", id="empty-body"),
        pytest.param(with_(body=3), "spec.body", "expected a string", id="body-type"),
        pytest.param(with_(slots={}), "spec.slots", "expected a list", id="slots-type"),
        pytest.param(with_(slots=[{"name": "x"}]), "spec.slots[0]", "a name and a type", id="slot-no-type"),
        pytest.param(
            with_(slots=[{"name": "persona", "type": "stable"}]), "spec.slots[0].type", "must be one of",
            id="type-case",
        ),
        pytest.param(
            with_(slots=[{"name": "a-b", "type": "Stable"}]), "spec.slots[0].name", "not a slot name",
            id="name",
        ),
        pytest.param(
            with_(slots=[{"name": "p", "type": "Stable", "required": "yes"}]), "spec.slots[0].required",
            "true or false", id="required-type",
        ),
        pytest.param(
            with_(slots=[{"name": "p", "type": "Stable", "maxLength": 0}]), "spec.slots[0].maxLength",
            "positive integer", id="max-length",
        ),
        pytest.param(
            with_(slots=[{"name": "p", "type": "Stable", "maxLength": True}]), "spec.slots[0].maxLength",
            "positive integer", id="max-length-bool",
        ),
        pytest.param(
            with_(slots=[{"name": "p", "type": "Stable", "colour": 1}]), "spec.slots[0].colour",
            "unknown field", id="slot-unknown-field",
        ),
        pytest.param(
            with_(slots=[*BASE["slots"], {"name": "persona", "type": "Stable"}]), "spec.slots[2].name",
            "declared twice", id="duplicate-slot",
        ),
        pytest.param(with_(normalization="squash"), "spec.normalization", "none, trim, collapse", id="norm"),
        pytest.param(with_(allowedNamespaces=["Team_A"]), "spec.allowedNamespaces[0]", "namespace", id="ns"),
        pytest.param(with_(allowedNamespaces=["a", "a"]), "spec.allowedNamespaces", "twice", id="ns-dup"),
        pytest.param(
            with_(slots=[*BASE["slots"], {"name": "unused", "type": "Mutable"}]), "spec.slots",
            "'unused' is declared but not used", id="unused-slot",
        ),
        pytest.param(
            {"messages": [{"role": "robot", "body": "x"}]}, "spec.messages[0].role", "must be one of",
            id="role",
        ),
        pytest.param({"messages": [{"role": "user"}]}, "spec.messages[0]", "role and a body", id="message"),
        pytest.param({"messages": []}, "spec.messages", "must not be empty", id="no-messages"),
    ],
)  # fmt: skip
def test_strict_errors(spec: Any, path: str, message: str) -> None:
    with pytest.raises(TemplateSpecError) as info:
        TemplateSpec.from_dict(spec)
    assert info.value.path == path
    assert message in info.value.message


@pytest.mark.parametrize(
    ("spec", "path", "line", "column", "message"),
    [
        pytest.param(with_(body="Hi {{.persona}}\n{{ .who }}"), "spec.body", 2, 1, "'who' is not declared",
                     id="undeclared"),
        pytest.param(with_(body="{{.question}}\n\n  {{.persona}}"), "spec.body", 3, 3,
                     "Stable slot 'persona' follows Mutable slot 'question' (spec.body, line 1, column 1)",
                     id="stable-after-mutable"),
        pytest.param(with_(body="{{.persona}} {{user}}"), "spec.body", 1, 16, "unknown placeholder",
                     id="syntax"),
        pytest.param({"messages": [{"role": "user", "body": "{{.q}}"}, {"role": "user", "body": "x {{.s}}"}],
                      "slots": [{"name": "q", "type": "Mutable"}, {"name": "s", "type": "Stable"}]},
                     "spec.messages[1].body", 1, 3, "follows Mutable slot 'q' (spec.messages[0].body",
                     id="stable-after-mutable-across-messages"),
    ],
)  # fmt: skip
def test_body_errors_have_positions(spec: Any, path: str, line: int, column: int, message: str) -> None:
    with pytest.raises(TemplateSpecError) as info:
        TemplateSpec.from_dict(spec)
    assert (info.value.path, info.value.line, info.value.column) == (path, line, column)
    assert message in info.value.message
    assert str(info.value).startswith(f"{path} (line {line}, column {column}): ")


def test_to_dict_round_trip() -> None:
    spec = TemplateSpec.from_dict(BASE)
    assert TemplateSpec.from_dict(spec.to_dict()) == spec
    minimal = TemplateSpec.from_dict({"body": "static"})
    assert minimal.to_dict() == {
        "body": "static",
        "slots": [],
        "normalization": "none",
        "allowedNamespaces": [],
    }


def test_revision_is_a_content_hash() -> None:
    spec = TemplateSpec.from_dict(BASE)
    rev = revision(spec)
    assert len(rev) == 16 and int(rev, 16) >= 0
    reordered = with_(slots=list(reversed(BASE["slots"])))
    assert revision(TemplateSpec.from_dict(reordered)) == rev
    assert revision(TemplateSpec.from_dict(with_(body=BASE["body"] + "!"))) != rev
    assert revision(TemplateSpec.from_dict(with_(normalization="trim"))) != rev
    # An explicit default is the same spec.
    explicit = {**BASE, "slots": [{**BASE["slots"][0], "description": "who answers"}, BASE["slots"][1]]}
    assert revision(TemplateSpec.from_dict(explicit)) == rev
