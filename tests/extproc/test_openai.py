"""``extproc.openai``: OpenAI request bodies -> ``ParsedRequest`` or a ``Rejection``.

Pure functions, nothing mocked. We test: every accepted body shape of ``/v1/completions``
and ``/v1/chat/completions`` with vLLM's defaults, content-part flattening as the fake
engine does it, every refusal (status, OpenAI message, ``param``), the ``limits`` bounds,
large and non-ASCII bodies, and the approximate index's text.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import pytest

from inference_cache.extproc import openai
from inference_cache.extproc.openai import Limits, ParsedRequest, TemplateRef
from inference_cache.extproc.picking import ErrorKind, Rejection

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LIMITS = Limits()


def parse(path: str, body: dict[str, Any] | bytes, limits: Limits = LIMITS) -> ParsedRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return openai.parse(path, raw, limits)


def rejected(path: str, body: dict[str, Any] | bytes, limits: Limits = LIMITS) -> Rejection:
    with pytest.raises(Rejection) as info:
        parse(path, body, limits)
    return info.value


def chat(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "api"),
    [
        pytest.param("/v1/completions", "completions", id="completions"),
        pytest.param("/v1/chat/completions", "chat", id="chat"),
        pytest.param("/v1/chat/completions?api-version=1&x=/v1", "chat", id="chat-query"),
        pytest.param("/v1/completions?", "completions", id="empty-query"),
        pytest.param("/v1/models", None, id="models"),
        pytest.param("/v1/embeddings", None, id="embeddings"),
        pytest.param("/v1/completions/", None, id="trailing-slash"),
        pytest.param("/V1/completions", None, id="case"),
        pytest.param("/health?/v1/completions", None, id="path-in-query"),
        pytest.param("", None, id="empty"),
    ],
)
def test_api_of(path: str, api: str | None) -> None:
    assert openai.api_of(path) == api


def test_parse_refuses_other_paths_as_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="not an OpenAI inference path"):
        openai.parse("/v1/models", b'{"model": "m"}', LIMITS)


def test_query_string_is_ignored_when_parsing() -> None:
    req = parse(CHAT + "?stream=false", chat(user("hi")))
    assert req.api == "chat"
    assert req.messages == ({"role": "user", "content": "hi"},)


# -- completions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "prompts", "token_ids"),
    [
        pytest.param("hello", ("hello",), (), id="string"),
        pytest.param("", ("",), (), id="empty-string"),
        pytest.param(["a", "b c"], ("a", "b c"), (), id="list-of-strings"),
        pytest.param([1, 2, 3], (), ((1, 2, 3),), id="token-ids"),
        pytest.param([0, 4294967295], (), ((0, 4294967295),), id="token-id-bounds"),
        pytest.param([[1, 2], [3]], (), ((1, 2), (3,)), id="list-of-token-ids"),
    ],
)
def test_completions_prompt_shapes(
    prompt: Any, prompts: tuple[str, ...], token_ids: tuple[tuple[int, ...], ...]
) -> None:
    req = parse(COMPLETIONS, {"model": "m", "prompt": prompt})
    assert req.api == "completions"
    assert (req.prompts, req.token_ids) == (prompts, token_ids)
    assert req.messages == ()


def test_completions_defaults_are_vllms() -> None:
    req = parse(COMPLETIONS, {"model": "m", "prompt": "x"})
    assert req == ParsedRequest(api="completions", model="m", prompts=("x",))
    assert (req.stream, req.cache_salt, req.add_special_tokens, req.template) == (False, None, True, None)


def test_completions_fields() -> None:
    body = {
        "model": "sql-lora",
        "prompt": "x",
        "stream": True,
        "cache_salt": "tenant-a",
        "add_special_tokens": False,
        "max_tokens": 5,
        "unknown_engine_field": {"kept": "by the engine"},
    }
    req = parse(COMPLETIONS, body)
    assert (req.model, req.stream, req.cache_salt, req.add_special_tokens) == (
        "sql-lora",
        True,
        "tenant-a",
        False,
    )


def test_null_optional_fields_mean_their_defaults() -> None:
    nulls = dict.fromkeys(("stream", "cache_salt", "add_special_tokens", "template"))
    assert parse(COMPLETIONS, {"model": "m", "prompt": "x", **nulls}) == ParsedRequest(
        api="completions", model="m", prompts=("x",)
    )
    chat_nulls = dict.fromkeys(
        ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "stream")
    )
    req = parse(CHAT, chat(user("x"), **chat_nulls))
    assert (req.tools, req.chat_template_kwargs, req.add_generation_prompt, req.continue_final_message) == (
        None,
        None,
        True,
        False,
    )


# -- chat ----------------------------------------------------------------------------------


def test_chat_defaults_are_vllms() -> None:
    req = parse(CHAT, chat(user("hi")))
    assert req == ParsedRequest(
        api="chat",
        model="m",
        add_special_tokens=False,
        messages=({"role": "user", "content": "hi"},),
    )
    assert (req.add_generation_prompt, req.continue_final_message, req.tools) == (True, False, None)


def test_chat_fields() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = parse(
        CHAT,
        chat(
            {"role": "assistant", "content": "Hel"},
            tools=tools,
            chat_template_kwargs={"enable_thinking": False},
            add_generation_prompt=False,
            continue_final_message=True,
            add_special_tokens=True,
            stream=True,
            cache_salt="s",
        ),
    )
    assert req.tools == tuple(tools)
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert (req.add_generation_prompt, req.continue_final_message) == (False, True)
    assert (req.add_special_tokens, req.stream, req.cache_salt) == (True, True, "s")


def test_chat_empty_tools_list_is_kept() -> None:
    assert parse(CHAT, chat(user("x"), tools=[])).tools == ()


def test_chat_message_keys_pass_through() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "hm"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert parse(CHAT, chat(*messages)).messages == tuple(messages)


@pytest.mark.parametrize(
    ("content", "flat"),
    [
        pytest.param([{"type": "text", "text": "a"}], "a", id="one-text-part"),
        pytest.param(
            [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb", id="joined-by-newline"
        ),
        pytest.param(
            [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "what is this?"},
                {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
            ],
            "what is this?",
            id="non-text-parts-dropped",
        ),
        pytest.param([{"type": "text", "text": "a"}, "b"], "a\nb", id="bare-string-part"),
        pytest.param([], "", id="no-parts"),
        pytest.param([{"type": "image_url", "image_url": {"url": "x"}}], "", id="only-an-image"),
        pytest.param([{"type": "text", "text": "x", "cache_control": {}}], "x", id="extra-part-keys"),
    ],
)
def test_content_parts_are_kept_and_their_text_counted(content: list[Any], flat: str) -> None:
    message = {"role": "user", "content": content, "name": "n"}
    (got,) = parse(CHAT, chat(message)).messages
    assert got == message  # the tokenizer's vllm_conversation shapes parts for the template
    exact = Limits(max_text_bytes=max(len(flat.encode()), 1))
    assert parse(CHAT, chat(message), exact).messages == (message,)
    if flat:
        with pytest.raises(Rejection):
            parse(CHAT, chat(message), Limits(max_text_bytes=len(flat.encode()) - 1))


def test_unicode_text_survives_escaped_and_raw() -> None:
    text = "héllo wörld — 日本語 🙂"
    escaped = json.dumps(chat(user(text)), ensure_ascii=True).encode()
    raw = json.dumps(chat(user(text)), ensure_ascii=False).encode()
    assert b"\\ud83d\\ude42" in escaped  # the emoji as a surrogate pair escape
    for body in (escaped, raw, b"\xef\xbb\xbf" + raw, raw.decode().encode("utf-16")):
        assert parse(CHAT, body).messages[0]["content"] == text


def test_lora_names_are_kept_as_the_model() -> None:
    assert parse(CHAT, {**chat(user("x")), "model": "org/base:sql-lora"}).model == "org/base:sql-lora"


# -- template ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "ref"),
    [
        pytest.param({"name": "ns/support"}, TemplateRef("ns/support"), id="name-only"),
        pytest.param({"name": "t", "variables": None}, TemplateRef("t"), id="null-variables"),
        pytest.param(
            {"name": "t", "variables": {"user": "bob", "topic": ""}},
            TemplateRef("t", {"user": "bob", "topic": ""}),
            id="variables",
        ),
    ],
)
def test_template_field(template: dict[str, Any], ref: TemplateRef) -> None:
    assert parse(CHAT, chat(user("x"), template=template)).template == ref
    assert parse(COMPLETIONS, {"model": "m", "prompt": "x", "template": template}).template == ref


def test_template_variables_are_read_only() -> None:
    ref = parse(CHAT, chat(user("x"), template={"name": "t", "variables": {"a": "b"}})).template
    assert ref is not None
    with pytest.raises(TypeError):
        ref.variables["a"] = "c"  # type: ignore[index]


# -- refusals ------------------------------------------------------------------------------

BAD = [
    # (path, body, param, exact message)
    (CHAT, b"", None, "The request body is empty; expected a JSON object."),
    (
        CHAT,
        b'{"model": "m",',
        None,
        "The request body is not valid JSON: Expecting property name enclosed in double quotes "
        "(line 1 column 15, char 14).",
    ),
    (CHAT, b'{"model": "\xff"}', None, "The request body is not valid JSON: invalid UTF-8 at byte 11."),
    (CHAT, b"[" * 100_000 + b"]" * 100_000, None, "The request body is not valid JSON."),
    (
        COMPLETIONS,
        b'{"model": "m", "prompt": [' + b"9" * 5000 + b"]}",
        None,
        "The request body is not valid JSON.",
    ),
    (CHAT, b"[1, 2]", None, "The request body must be a JSON object, but got an array instead."),
    (CHAT, b'"model"', None, "The request body must be a JSON object, but got a string instead."),
    (CHAT, b"null", None, "The request body must be a JSON object, but got null instead."),
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model", "you must provide a model parameter"),
    (CHAT, {"model": "", "messages": []}, "model", "you must provide a model parameter"),
    (CHAT, {"model": None}, "model", "you must provide a model parameter"),
    (
        CHAT,
        {"model": ["m"]},
        "model",
        "Invalid type for 'model': expected a string, but got an array instead.",
    ),
    (
        CHAT,
        {"model": 7},
        "model",
        "Invalid type for 'model': expected a string, but got an integer instead.",
    ),
    (CHAT, {"model": "m"}, "messages", "Missing required parameter: 'messages'."),
    (
        CHAT,
        {"model": "m", "messages": {"role": "user"}},
        "messages",
        "Invalid type for 'messages': expected an array of objects, but got an object instead.",
    ),
    (
        CHAT,
        {"model": "m", "messages": []},
        "messages",
        "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty "
        "array instead.",
    ),
    (
        CHAT,
        chat(user("x"), "hi"),
        "messages[1]",
        "Invalid type for 'messages[1]': expected an object, but got a string instead.",
    ),
    (CHAT, chat({"content": "x"}), "messages[0].role", "Missing required parameter: 'messages[0].role'."),
    (
        CHAT,
        chat({"role": 1, "content": "x"}),
        "messages[0].role",
        "Invalid type for 'messages[0].role': expected a string, but got an integer instead.",
    ),
    (
        CHAT,
        chat(user("a"), user("b"), user("c"), user(12.5)),
        "messages[3].content",
        "Invalid type for 'messages[3].content': expected a string or an array of content parts, "
        "but got a number instead.",
    ),
    (
        CHAT,
        chat(user({"type": "text", "text": "x"})),
        "messages[0].content",
        "Invalid type for 'messages[0].content': expected a string or an array of content parts, "
        "but got an object instead.",
    ),
    (
        CHAT,
        chat(user([{"type": "text", "text": "a"}, 3])),
        "messages[0].content[1]",
        "Invalid type for 'messages[0].content[1]': expected an object, but got an integer instead.",
    ),
    (
        CHAT,
        chat(user([{"text": "a"}])),
        "messages[0].content[0].type",
        "Missing required parameter: 'messages[0].content[0].type'.",
    ),
    (
        CHAT,
        chat(user([{"type": ["text"], "text": "a"}])),
        "messages[0].content[0].type",
        "Invalid type for 'messages[0].content[0].type': expected a string, but got an array instead.",
    ),
    (
        CHAT,
        chat(user([{"type": "text"}])),
        "messages[0].content[0].text",
        "Missing required parameter: 'messages[0].content[0].text'.",
    ),
    (
        CHAT,
        chat(user([{"type": "text", "text": {"value": "a"}}])),
        "messages[0].content[0].text",
        "Invalid type for 'messages[0].content[0].text': expected a string, but got an object instead.",
    ),
    (
        CHAT,
        chat({"role": "user", "content": "x", "name": 5}),
        "messages[0].name",
        "Invalid type for 'messages[0].name': expected a string, but got an integer instead.",
    ),
    (
        CHAT,
        chat({"role": "tool", "content": "x", "tool_call_id": False}),
        "messages[0].tool_call_id",
        "Invalid type for 'messages[0].tool_call_id': expected a string, but got a boolean instead.",
    ),
    (
        CHAT,
        chat({"role": "assistant", "tool_calls": {"id": "c"}}),
        "messages[0].tool_calls",
        "Invalid type for 'messages[0].tool_calls': expected an array of objects, but got an object instead.",
    ),
    (
        CHAT,
        chat({"role": "assistant", "tool_calls": ["c"]}),
        "messages[0].tool_calls[0]",
        "Invalid type for 'messages[0].tool_calls[0]': expected an object, but got a string instead.",
    ),
    (
        CHAT,
        chat(user("x"), tools={"type": "function"}),
        "tools",
        "Invalid type for 'tools': expected an array of objects, but got an object instead.",
    ),
    (
        CHAT,
        chat(user("x"), tools=[{"type": "function"}, "f"]),
        "tools[1]",
        "Invalid type for 'tools[1]': expected an object, but got a string instead.",
    ),
    (
        CHAT,
        chat(user("x"), chat_template_kwargs=["enable_thinking"]),
        "chat_template_kwargs",
        "Invalid type for 'chat_template_kwargs': expected an object, but got an array instead.",
    ),
    (
        CHAT,
        chat(user("x"), add_generation_prompt="yes"),
        "add_generation_prompt",
        "Invalid type for 'add_generation_prompt': expected a boolean, but got a string instead.",
    ),
    (
        CHAT,
        chat(user("x"), continue_final_message=1),
        "continue_final_message",
        "Invalid type for 'continue_final_message': expected a boolean, but got an integer instead.",
    ),
    (
        CHAT,
        chat(user("x"), continue_final_message=True),
        "continue_final_message",
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
    ),
    (
        CHAT,
        chat(user("x"), stream="true"),
        "stream",
        "Invalid type for 'stream': expected a boolean, but got a string instead.",
    ),
    (
        CHAT,
        chat(user("x"), add_special_tokens=0),
        "add_special_tokens",
        "Invalid type for 'add_special_tokens': expected a boolean, but got an integer instead.",
    ),
    (
        CHAT,
        chat(user("x"), cache_salt=""),
        "cache_salt",
        "Invalid 'cache_salt': expected a non-empty string.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": "x", "cache_salt": 42},
        "cache_salt",
        "Invalid type for 'cache_salt': expected a string, but got an integer instead.",
    ),
    (
        CHAT,
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "cache_salt": "\\ud800"}',
        "cache_salt",
        "Invalid 'cache_salt': the string holds an unpaired UTF-16 surrogate escape.",
    ),
    (
        CHAT,
        b'{"model": "m", "messages": [{"role": "user", "content": "a\\udc00b"}]}',
        "messages[0].content",
        "Invalid 'messages[0].content': the string holds an unpaired UTF-16 surrogate escape.",
    ),
    (
        CHAT,
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
        "messages[0].content",
        "Invalid 'messages[0].content': the string holds an unpaired UTF-16 surrogate escape.",
    ),
    (COMPLETIONS, {"model": "m"}, "prompt", "Missing required parameter: 'prompt'."),
    (
        COMPLETIONS,
        {"model": "m", "prompt": 5},
        "prompt",
        "Invalid type for 'prompt': expected a string, an array of strings, an array of token ids or "
        "an array of those, but got an integer instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": []},
        "prompt",
        "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an empty "
        "array instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [[1], []]},
        "prompt[1]",
        "Invalid 'prompt[1]': empty array. Expected an array with minimum length 1, but got an empty "
        "array instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": ["a", 1]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected a string, but got an integer instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [1, "a"]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an integer token id, but got a string instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [1, True]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an integer token id, but got a boolean instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [1, 2.0]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an integer token id, but got a number instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [[1], [2, 3, None]]},
        "prompt[1][2]",
        "Invalid type for 'prompt[1][2]': expected an integer token id, but got null instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [[1], 2]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an array of token ids, but got an integer instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [1, -1]},
        "prompt[1]",
        "Invalid 'prompt[1]': a token id must be in [0, 4294967295].",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [[7], [1, 2, 4294967296]]},
        "prompt[1][2]",
        "Invalid 'prompt[1][2]': a token id must be in [0, 4294967295].",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": [{"text": "a"}]},
        "prompt[0]",
        "Invalid type for 'prompt[0]': expected a string, a token id or an array of token ids, but got "
        "an object instead.",
    ),
    (
        COMPLETIONS,
        {"model": "m", "prompt": "x", "add_special_tokens": "false"},
        "add_special_tokens",
        "Invalid type for 'add_special_tokens': expected a boolean, but got a string instead.",
    ),
    (
        CHAT,
        chat(user("x"), template="support"),
        "template",
        "Invalid type for 'template': expected an object, but got a string instead.",
    ),
    (CHAT, chat(user("x"), template={}), "template.name", "Missing required parameter: 'template.name'."),
    (
        CHAT,
        chat(user("x"), template={"name": 1}),
        "template.name",
        "Invalid type for 'template.name': expected a string, but got an integer instead.",
    ),
    (
        CHAT,
        chat(user("x"), template={"name": ""}),
        "template.name",
        "Invalid 'template.name': expected a non-empty string.",
    ),
    (
        CHAT,
        chat(user("x"), template={"name": "t", "variables": ["a"]}),
        "template.variables",
        "Invalid type for 'template.variables': expected an object, but got an array instead.",
    ),
    (
        CHAT,
        chat(user("x"), template={"name": "t", "variables": {"a": "1", "n": 2}}),
        "template.variables.n",
        "Invalid type for 'template.variables.n': expected a string, but got an integer instead.",
    ),
    (
        CHAT,
        chat(user("x"), template={"name": "t", "revision": "3"}),
        "template",
        "Unrecognized argument 'template.revision'; expected 'name' and 'variables'.",
    ),
]


@pytest.mark.parametrize(("path", "body", "param", "message"), BAD, ids=[f"{b[0]}:{b[2]}" for b in BAD])
def test_bad_requests(path: str, body: dict[str, Any] | bytes, param: str | None, message: str) -> None:
    rejection = rejected(path, body)
    assert (rejection.kind, rejection.status, rejection.param, rejection.message) == (
        ErrorKind.BAD_REQUEST,
        400,
        param,
        message,
    )


def test_a_refusal_is_an_openai_error_body() -> None:
    rejection = rejected(CHAT, chat(user(3)))
    assert json.loads(rejection.body()) == {
        "error": {
            "message": "Invalid type for 'messages[0].content': expected a string or an array of content "
            "parts, but got an integer instead.",
            "type": "invalid_request_error",
            "param": "messages[0].content",
            "code": None,
        }
    }


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(chat(user(["x" * 100_000])), id="wrong-type-part"),
        pytest.param(chat(user("x"), stream=["y" * 100_000]), id="wrong-type-field"),
        pytest.param(
            {"model": "m", "prompt": "x", "template": {"name": "t", "z" * 100_000: 1}}, id="unknown-key"
        ),
        pytest.param(
            {"model": "m", "prompt": "x", "template": {"name": "t", "variables": {"v" * 100_000: 1}}},
            id="variable-name",
        ),
        pytest.param(b'{"model": "m", "prompt": "' + b"x" * 100_000 + b"\x00", id="decoder-error"),
    ],
)
def test_messages_never_echo_large_values(body: dict[str, Any] | bytes) -> None:
    rejection = rejected(COMPLETIONS, body)
    assert len(rejection.body()) < 400
    assert "x" * 100 not in rejection.message
    assert len(rejection.param or "") < 100


# -- limits --------------------------------------------------------------------------------


def test_limit_defaults_and_plain_types() -> None:
    assert Limits() == Limits(
        max_body_bytes=16 * 1024 * 1024,
        max_messages=2048,
        max_prompts=128,
        max_token_ids=1 << 20,
        max_text_bytes=8 * 1024 * 1024,
        shed_ttft_ms=0.0,
    )
    hints = typing.get_type_hints(Limits)
    assert {f.name: hints[f.name] for f in dataclasses.fields(Limits)} == {
        "max_body_bytes": int,
        "max_messages": int,
        "max_prompts": int,
        "max_token_ids": int,
        "max_text_bytes": int,
        "shed_ttft_ms": float,
    }


def test_body_over_max_body_bytes_is_too_large() -> None:
    body = json.dumps(chat(user("x" * 100))).encode()
    assert parse(CHAT, body, Limits(max_body_bytes=len(body))).messages
    rejection = rejected(CHAT, body, Limits(max_body_bytes=len(body) - 1))
    assert (rejection.kind, rejection.status, rejection.param) == (ErrorKind.TOO_LARGE, 413, None)
    assert rejection.message == (
        f"The request body is {len(body)} bytes, over the limit of {len(body) - 1} bytes."
    )


def test_size_is_checked_before_parsing() -> None:
    assert rejected(CHAT, b"not json at all", Limits(max_body_bytes=4)).kind is ErrorKind.TOO_LARGE


def test_max_messages() -> None:
    three = chat(user("a"), user("b"), user("c"))
    assert len(parse(CHAT, three, Limits(max_messages=3)).messages) == 3
    rejection = rejected(CHAT, three, Limits(max_messages=2))
    assert (rejection.param, rejection.message) == (
        "messages",
        "Invalid 'messages': array too long. Expected an array with maximum length 2, but got an "
        "array with length 3 instead.",
    )


@pytest.mark.parametrize(
    "prompt", [pytest.param(["a", "b", "c"], id="strings"), pytest.param([[1], [2], [3]], id="token-lists")]
)
def test_max_prompts(prompt: list[Any]) -> None:
    body = {"model": "m", "prompt": prompt}
    parse(COMPLETIONS, body, Limits(max_prompts=3))
    rejection = rejected(COMPLETIONS, body, Limits(max_prompts=2))
    assert (rejection.param, rejection.message) == (
        "prompt",
        "Invalid 'prompt': array too long. Expected an array with maximum length 2, but got an "
        "array with length 3 instead.",
    )


def test_a_single_token_list_is_one_prompt() -> None:
    assert parse(COMPLETIONS, {"model": "m", "prompt": [1, 2, 3]}, Limits(max_prompts=1)).token_ids == (
        (1, 2, 3),
    )


@pytest.mark.parametrize(
    ("prompt", "param"),
    [
        pytest.param([1, 2, 3, 4], "prompt", id="one-list"),
        pytest.param([[1, 2], [3, 4]], "prompt[1]", id="summed-over-the-batch"),
    ],
)
def test_max_token_ids(prompt: list[Any], param: str) -> None:
    body = {"model": "m", "prompt": prompt}
    parse(COMPLETIONS, body, Limits(max_token_ids=4))
    rejection = rejected(COMPLETIONS, body, Limits(max_token_ids=3))
    assert (rejection.kind, rejection.param) == (ErrorKind.BAD_REQUEST, param)
    assert "the limit is 3" in rejection.message


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        # "é" is 2 UTF-8 bytes: 3 + 2 * 2 = 7 bytes in all.
        pytest.param(COMPLETIONS, {"model": "m", "prompt": "abcéé"}, "prompt", id="prompt"),
        pytest.param(COMPLETIONS, {"model": "m", "prompt": ["abc", "éé"]}, "prompt[1]", id="prompts"),
        pytest.param(CHAT, chat(user("abc"), user("éé")), "messages[1].content", id="messages"),
        pytest.param(
            CHAT,
            chat(user([{"type": "text", "text": "ab"}, {"type": "text", "text": "éé"}])),
            "messages[0].content",
            id="parts-with-their-newline",
        ),
    ],
)
def test_max_text_bytes_counts_utf8_bytes(path: str, body: dict[str, Any], param: str) -> None:
    parse(path, body, Limits(max_text_bytes=7))
    rejection = rejected(path, body, Limits(max_text_bytes=6))
    assert (rejection.kind, rejection.param) == (ErrorKind.BAD_REQUEST, param)
    assert rejection.message == f"The request's prompt text is over the limit of 6 bytes (at '{param}')."


def test_one_megabyte_bodies_are_accepted() -> None:
    system = "You are a careful assistant. " * 40_000  # ~1.1 MB
    body = json.dumps(chat({"role": "system", "content": system}, user("hi"))).encode()
    assert len(body) > 1 << 20
    assert parse(CHAT, body).messages[0]["content"] == system
    ids = list(range(200_000))
    body = json.dumps({"model": "m", "prompt": ids}).encode()
    assert len(body) > 1 << 20
    assert parse(COMPLETIONS, body).token_ids == (tuple(ids),)


# -- approximate text ----------------------------------------------------------------------


def test_approx_text_of_chat_is_compact_json_of_the_messages() -> None:
    req = parse(CHAT, chat({"role": "system", "content": "héllo"}, user([{"type": "text", "text": "q"}])))
    assert (
        openai.approx_text(req)
        == (
            '[{"role":"system","content":"héllo"},{"role":"user","content":[{"type":"text","text":"q"}]}]'
        ).encode()
    )


def test_approx_text_prepends_the_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    req = parse(CHAT, chat(user("q"), tools=tools))
    assert openai.approx_text(req) == (
        b'[{"type":"function","function":{"name":"f"}}][{"role":"user","content":"q"}]'
    )


def test_approx_text_of_a_follow_up_turn_extends_the_first() -> None:
    first = [{"role": "system", "content": "s"}, user("q1")]
    follow_up = [*first, {"role": "assistant", "content": "a1"}, user("q2")]
    a = openai.approx_text(parse(CHAT, chat(*first)))
    b = openai.approx_text(parse(CHAT, chat(*follow_up)))
    assert b.startswith(a[:-1])
    assert openai.approx_text(parse(CHAT, chat(*first))) == a


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        pytest.param("héllo", "héllo".encode(), id="string"),
        pytest.param(["a", "b"], b"a\nb", id="strings"),
        pytest.param([1, 22, 333], b"1,22,333", id="token-ids"),
        pytest.param([[1, 2], [3]], b"1,2\n3", id="token-lists"),
    ],
)
def test_approx_text_of_completions(prompt: Any, text: bytes) -> None:
    assert openai.approx_text(parse(COMPLETIONS, {"model": "m", "prompt": prompt})) == text


def test_approx_text_tolerates_lone_surrogates_outside_the_text() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "q", "name": "\\ud800"}]}'
    assert openai.approx_text(parse(CHAT, body)).endswith(b'"name":"\xed\xa0\x80"}]')
