"""``extproc.templates``: the TemplateStore (namespaces, replace-on-write, the stable-prefix
LRU), the ``PUT /templates`` codec and the templated-request rewrite.

Pure: no sockets. The stable-prefix cache runs on the tiny test tokenizer; its results are
compared with ``render.stable_prefix`` itself (the library is tested in ``tests/render``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inference_cache import render
from inference_cache.extproc import templates
from inference_cache.tokenizer import PromptTokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
SPEC: dict[str, Any] = {
    "body": "You are {{.persona}}.\n\nQuestion: {{.question}}",
    "slots": [
        {"name": "persona", "type": "Stable", "required": True},
        {"name": "question", "type": "Mutable"},
    ],
    "normalization": "collapse",
    "allowedNamespaces": ["team-b"],
}
CHAT: dict[str, Any] = {
    "messages": [{"role": "system", "body": "{{.persona}}"}, {"role": "user", "body": "{{.question}}"}],
    "slots": [{"name": "persona", "type": "Stable"}, {"name": "question", "type": "Mutable"}],
}


@pytest.fixture(scope="module")
def tiny() -> PromptTokenizer:
    return PromptTokenizer.load(TINY)


def test_build_checks_names_and_computes_the_revision() -> None:
    t = templates.build("team-a", "support.v2", SPEC)
    assert (t.ref, t.revision) == ("team-a/support.v2", render.revision(render.TemplateSpec.from_dict(SPEC)))
    with pytest.raises(templates.TemplateDecodeError, match=r"^x\.name: 'Bad_Name' is not an object name"):
        templates.build("team-a", "Bad_Name", SPEC, where="x")
    with pytest.raises(templates.TemplateDecodeError, match=r"^namespace: '' is not a namespace name"):
        templates.build("", "n", SPEC)
    with pytest.raises(templates.TemplateDecodeError, match=r"^t\.spec\.normalization: must be one of"):
        templates.build("a", "n", {**SPEC, "normalization": "squash"}, where="t")


@pytest.mark.parametrize(
    ("ref", "namespace", "found"),
    [
        ("team-a/support", "team-a", True),
        ("support", "team-a", True),  # a bare name is in the caller's namespace
        ("team-a/support", "team-b", True),  # allowedNamespaces
        ("support", "team-b", False),  # ... but team-b/support does not exist
        ("team-a/support", "team-c", False),
        ("team-a/support", "", False),
        ("team-a/other", "team-a", False),
        ("team-a/chat", "team-b", False),  # no allowedNamespaces
    ],
)
def test_lookup_follows_the_namespace_rule(ref: str, namespace: str, found: bool) -> None:
    store = templates.TemplateStore(
        [templates.build("team-a", "support", SPEC), templates.build("team-a", "chat", CHAT)]
    )
    got = store.lookup(ref, namespace)
    assert (got is not None) == found
    if got is not None:
        assert (
            got.ref == templates.split_ref(ref, namespace)[0] + "/" + templates.split_ref(ref, namespace)[1]
        )


def test_replace_swaps_the_whole_set() -> None:
    store = templates.TemplateStore([templates.build("a", "one", SPEC)])
    store.replace([templates.build("b", "two", SPEC), templates.build("b", "three", CHAT)])
    assert len(store) == 2
    assert store.lookup("a/one", "a") is None
    assert store.lookup("b/three", "b") is not None


def test_stable_keys_are_the_librarys_and_cached_by_normalised_values(tiny: PromptTokenizer) -> None:
    store = templates.TemplateStore(cache_size=2)
    t = templates.build("a", "one", SPEC)
    persona = "a careful " * 20
    want = render.stable_prefix(t.spec, tiny, 4, variables={"persona": persona})
    assert len(want.block_keys) > 2

    def keys(**kw: Any) -> render.StablePrefix:
        kw.setdefault("variables", {"persona": persona, "question": "why?"})
        return store.stable_keys(t, tiny, model="m", block_size=4, **kw)

    first = keys()
    assert first == want
    # Equal after normalisation (collapse) and another Mutable value: the cached object.
    assert keys(variables={"persona": "  " + persona.replace(" ", "\t"), "question": "how?"}) is first
    assert store.cached == 1
    salted = keys(salt="s")
    assert salted.block_keys != first.block_keys and store.cached == 2
    assert keys(salt="s") is salted
    keys(variables={"persona": "someone else"})  # a third entry evicts the least recent (unsalted)
    assert store.cached == 2
    assert keys() is not first and keys() == first
    with pytest.raises(render.RenderError) as err:
        keys(variables={"question": "no persona"})
    assert (err.value.kind, err.value.slot) == ("missing_required", "persona")


def test_codec_round_trip_and_strictness() -> None:
    ts = [templates.build("a", "one", SPEC), templates.build("b", "chat", CHAT)]
    assert templates.decode(templates.encode(ts)) == tuple(ts)
    assert templates.decode(b'{"version": 1, "templates": []}') == ()
    bad = {
        b"[]": "expected a JSON object",
        b'{"version": 1}': "templates: expected a list",
        b'{"version": true, "templates": []}': "unsupported templates version True",
        b'{"version": 1, "templates": [NaN]}': "invalid JSON number NaN",
        b'{"version": 1, "templates": [1]}': "templates[0]: expected an object",
        b"\xff": "invalid UTF-8 at byte 0",
    }
    for body, message in bad.items():
        with pytest.raises(templates.TemplateDecodeError, match=message.replace("[", r"\[")):
            templates.decode(body)
    one = json.loads(templates.encode(ts[:1]))
    for field, value, message in [
        ("name", 3, r"templates\[0\]\.name: expected a string"),
        ("spec", "x", r"templates\[0\]\.spec: expected an object"),
        ("extra", "x", r"templates\[0\]\.extra: unknown field"),
    ]:
        body = {**one, "templates": [{**one["templates"][0], field: value}]}
        with pytest.raises(templates.TemplateDecodeError, match=message):
            templates.decode(json.dumps(body).encode())


def test_rewrite_gives_the_engine_a_plain_openai_request() -> None:
    text = render.render(render.TemplateSpec.from_dict(SPEC), {"persona": " x ", "question": "q?"})
    body = {"model": "m", "max_tokens": 5, "template": {"name": "a/one"}}
    assert json.loads(templates.rewrite(body, text)) == {
        "model": "m",
        "max_tokens": 5,
        "prompt": "You are x.\n\nQuestion: q?",
    }
    assert templates.rendered_json(text) == "You are x.\n\nQuestion: q?"
    chat = render.render(render.TemplateSpec.from_dict(CHAT), {"persona": "p", "question": "é?"})
    messages = [{"role": "system", "content": "p"}, {"role": "user", "content": "é?"}]
    assert json.loads(templates.rewrite({"model": "m", "template": {}}, chat)) == {
        "model": "m",
        "messages": messages,
    }
    assert json.loads(templates.rendered_json(chat)) == messages
    assert "é" in templates.rendered_json(chat)  # not \u-escaped
