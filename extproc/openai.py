"""OpenAI request bodies -> :class:`ParsedRequest`, the typed request the picker routes on.

Owner: ``inference_cache.extproc`` (the endpoint picker). Place in the flow::

    PickRequest(path, body) --parse--> ParsedRequest --> tokenizer (chat template, ids)
                                                     --> approx_text (no tokenizer: char chunks)
                            --Rejection(BAD_REQUEST | TOO_LARGE)--> ImmediateResponse 400/413

Pure: no I/O, no tokenizer. Reads exactly what routing needs from ``/v1/completions`` and
``/v1/chat/completions`` the way vLLM reads it (defaults, content-part flattening), and
refuses anything else it reads that has the wrong JSON type, with an OpenAI-style message
naming the field (``messages[3].content``). Values are never echoed (a body may be 16 MB);
only JSON type names and bounded excerpts appear in messages. Fields it does not read are
the engine's business and pass through untouched (the body is forwarded as is).

Text is checked once here: every prompt/message string must be encodable as UTF-8 (JSON
allows lone ``\\ud800`` escapes; tokenizers and the fingerprint's salt do not), and token
ids must fit the fingerprint's ``u32`` encoding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from inference_cache.extproc.picking import ErrorKind, Rejection

Api = Literal["completions", "chat"]

T = TypeVar("T")

#: Request paths (query string ignored) -> the API they speak.
PATHS: Mapping[str, Api] = MappingProxyType(
    {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
)
#: Token ids are hashed as little-endian ``u32`` (``index.fingerprint``).
TOKEN_ID_LIMIT = 1 << 32
#: Longest excerpt of a client-supplied string (a key name, a decoder message) in an error.
_EXCERPT = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """The ``limits:`` config section: bounds on what one request may ask of the picker."""

    #: Largest request body in bytes; larger bodies are refused with 413 before parsing.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Most ``messages`` in one chat request (OpenAI's own bound is 2048).
    max_messages: int = 2048
    #: Most prompts in one batched ``/v1/completions`` request (list of strings or of id lists).
    max_prompts: int = 128
    #: Most token ids in one ``/v1/completions`` request, summed over its prompts.
    max_token_ids: int = 1 << 20
    #: Most UTF-8 bytes of prompt / message text in one request (content parts flattened).
    max_text_bytes: int = 8 * 1024 * 1024
    #: Shed (429) a request when every candidate's predicted time to first token exceeds
    #: this many milliseconds; ``0`` never sheds. Read by the picker, not by :func:`parse`.
    shed_ttft_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class TemplateRef:
    """The optional ``"template": {"name": ..., "variables": {...}}`` body field (or the
    ``x-inference-cache-template`` header for the name): a named server-side prompt template
    (``namespace/name``) and its string variables (shape only; the picker renders it)."""

    name: str
    variables: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the picker needs from one OpenAI inference request.

    Completions carry exactly one of ``prompts`` (text) or ``token_ids`` (pre-tokenized);
    a single prompt is a batch of one. Chat carries ``messages`` as sent (validated; content
    parts kept: ``tokenizer.vllm_conversation`` turns them into what the template sees).
    """

    api: Api
    #: The ``model`` field as sent: a base model or a LoRA adapter name (the picker resolves it).
    model: str
    stream: bool = False
    #: Non-empty when present: the request's prefix-cache isolation salt.
    cache_salt: str | None = None
    #: Whether the engine adds special tokens (BOS) when tokenizing: vLLM defaults to
    #: ``True`` for completions and ``False`` for chat (the template has them).
    add_special_tokens: bool = True
    prompts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    messages: tuple[Mapping[str, Any], ...] = ()
    #: The chat ``tools`` list as sent (``None`` when absent).
    tools: tuple[Mapping[str, Any], ...] | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template: TemplateRef | None = None


def api_of(path: str) -> Api | None:
    """The API a request path speaks, or ``None`` (e.g. ``GET /v1/models``: route on load)."""
    return PATHS.get(path.partition("?")[0])


def parse(path: str, body: bytes, limits: Limits, *, template_name: str | None = None) -> ParsedRequest:
    """Parse an inference request; raise :class:`Rejection` for anything malformed.

    ``path`` must be one :func:`api_of` knows (``ValueError`` otherwise: a caller bug).
    ``template_name`` is the ``x-inference-cache-template`` header: it names the template
    when the body's ``template`` field does not (a different name in both is a 400). A
    templated request (either) needs no ``prompt`` / ``messages``: the picker renders them.
    """
    api = api_of(path)
    if api is None:
        raise ValueError(f"not an OpenAI inference path: {_excerpt(path)}")
    if len(body) > limits.max_body_bytes:
        raise Rejection(
            ErrorKind.TOO_LARGE,
            f"The request body is {len(body)} bytes, over the limit of {limits.max_body_bytes} bytes.",
        )
    obj = _load(body)
    model = obj.get("model")
    if model is None or model == "":
        raise Rejection(ErrorKind.BAD_REQUEST, "you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    budget = _TextBudget(limits.max_text_bytes)
    stream = _bool(obj, "stream", False)
    cache_salt = _cache_salt(obj)
    template = _template(obj, template_name)
    if template is not None and obj.get("prompt" if api == "completions" else "messages") is None:
        return ParsedRequest(api, model, stream, cache_salt, template=template)
    if api == "completions":
        prompts, token_ids = _prompt(obj, limits, budget)
        return ParsedRequest(
            api,
            model,
            stream,
            cache_salt,
            template=template,
            add_special_tokens=_bool(obj, "add_special_tokens", True),
            prompts=prompts,
            token_ids=token_ids,
        )
    add_generation_prompt = _bool(obj, "add_generation_prompt", True)
    continue_final_message = _bool(obj, "continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        raise Rejection(
            ErrorKind.BAD_REQUEST,
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            "continue_final_message",
        )
    tools = _optional(obj, "tools", list, "an array of objects")
    return ParsedRequest(
        api,
        model,
        stream,
        cache_salt,
        template=template,
        add_special_tokens=_bool(obj, "add_special_tokens", False),
        messages=_messages(obj, limits, budget),
        tools=None if tools is None else _objects(tools, "tools"),
        chat_template_kwargs=_optional(obj, "chat_template_kwargs", dict, "an object"),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )


def approx_text(request: ParsedRequest) -> bytes:
    """The bytes the tokenizer-free approximate prefix index chunks.

    Chat: the compact JSON of ``tools`` (when present) followed by that of ``messages``, so
    a follow-up turn extends the previous turn's bytes. Completions: the text prompts (or
    each id list as comma-separated decimals), one per line.
    """
    if request.api == "chat":
        text = _compact(request.messages)
        if request.tools is not None:
            text = _compact(request.tools) + text
        # Keys other than the validated texts may still hold lone surrogates.
        return text.encode("utf-8", "surrogatepass")
    if request.token_ids:
        return "\n".join(",".join(map(str, ids)) for ids in request.token_ids).encode()
    return "\n".join(request.prompts).encode()


# -- reading fields ------------------------------------------------------------------------


class _TextBudget:
    """Sums UTF-8 bytes of request text against ``max_text_bytes``, rejecting text that has
    no UTF-8 form (lone surrogates)."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def add(self, text: str, param: str) -> None:
        self.left -= _utf8_len(text, param)
        if self.left < 0:
            raise Rejection(
                ErrorKind.BAD_REQUEST,
                f"The request's prompt text is over the limit of {self.limit} bytes (at '{param}').",
                param,
            )


def _utf8_len(text: str, param: str) -> int:
    if text.isascii():  # O(1) in CPython: no copy for the common case
        return len(text)
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise _invalid(param, "the string holds an unpaired UTF-16 surrogate escape.") from None


def _load(body: bytes) -> dict[str, Any]:
    if not body:
        raise Rejection(ErrorKind.BAD_REQUEST, "The request body is empty; expected a JSON object.")
    try:
        obj = json.loads(body)  # bytes directly: one decode, no intermediate copies
    except json.JSONDecodeError as exc:
        raise Rejection(
            ErrorKind.BAD_REQUEST,
            f"The request body is not valid JSON: {_excerpt(exc.msg)} "
            f"(line {exc.lineno} column {exc.colno}, char {exc.pos}).",
        ) from exc
    except UnicodeDecodeError as exc:
        raise Rejection(
            ErrorKind.BAD_REQUEST,
            f"The request body is not valid JSON: invalid UTF-8 at byte {exc.start}.",
        ) from exc
    except (ValueError, RecursionError) as exc:  # integer too long; nesting too deep
        raise Rejection(ErrorKind.BAD_REQUEST, "The request body is not valid JSON.") from exc
    if not isinstance(obj, dict):
        raise Rejection(
            ErrorKind.BAD_REQUEST,
            f"The request body must be a JSON object, but got {_json_type(obj)} instead.",
        )
    return obj


def _bool(obj: Mapping[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong_type(key, "a boolean", value)
    return value


def _optional(obj: Mapping[str, Any], key: str, kind: type[T], expected: str) -> T | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise _wrong_type(key, expected, value)
    return value


def _cache_salt(obj: Mapping[str, Any]) -> str | None:
    salt = _optional(obj, "cache_salt", str, "a string")
    if salt == "":
        raise _invalid("cache_salt", "expected a non-empty string.")
    if salt is not None:
        _utf8_len(salt, "cache_salt")
    return salt


def _template(obj: Mapping[str, Any], header: str | None) -> TemplateRef | None:
    value = _optional(obj, "template", dict, "an object")
    if value is None:
        return TemplateRef(header) if header else None
    for key in value:
        if key not in ("name", "variables"):
            raise Rejection(
                ErrorKind.BAD_REQUEST,
                f"Unrecognized argument 'template.{_excerpt(key)}'; expected 'name' and 'variables'.",
                "template",
            )
    name = value.get("name")
    if header and name is not None and name != header:
        raise _invalid("template.name", "it differs from the x-inference-cache-template header.")
    name = header or name
    if name is None:
        raise _missing("template.name")
    if not isinstance(name, str):
        raise _wrong_type("template.name", "a string", name)
    if not name:
        raise _invalid("template.name", "expected a non-empty string.")
    variables = value.get("variables")
    if variables is None:
        return TemplateRef(name)
    if not isinstance(variables, dict):
        raise _wrong_type("template.variables", "an object", variables)
    for key, v in variables.items():
        if not isinstance(v, str):
            raise _wrong_type(f"template.variables.{_excerpt(key)}", "a string", v)
    return TemplateRef(name, MappingProxyType(variables))


def _prompt(
    obj: Mapping[str, Any], limits: Limits, budget: _TextBudget
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of those."""
    prompt = obj.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if isinstance(prompt, str):
        budget.add(prompt, "prompt")
        return (prompt,), ()
    if not isinstance(prompt, list):
        raise _wrong_type("prompt", _PROMPT_TYPES, prompt)
    if not prompt:
        raise _empty("prompt")
    first = prompt[0]
    if _is_int(first):
        return (), (_ids(prompt, "prompt", limits.max_token_ids, limits),)
    if isinstance(first, str):
        _at_most(prompt, "prompt", limits.max_prompts)
        for i, p in enumerate(prompt):
            if not isinstance(p, str):
                raise _wrong_type(f"prompt[{i}]", "a string", p)
            budget.add(p, f"prompt[{i}]")
        return tuple(prompt), ()
    if isinstance(first, list):
        _at_most(prompt, "prompt", limits.max_prompts)
        batch: list[tuple[int, ...]] = []
        left = limits.max_token_ids
        for i, p in enumerate(prompt):
            if not isinstance(p, list):
                raise _wrong_type(f"prompt[{i}]", "an array of token ids", p)
            ids = _ids(p, f"prompt[{i}]", left, limits)
            left -= len(ids)
            batch.append(ids)
        return (), tuple(batch)
    raise _wrong_type("prompt[0]", "a string, a token id or an array of token ids", first)


_PROMPT_TYPES = "a string, an array of strings, an array of token ids or an array of those"


def _ids(value: list[Any], param: str, left: int, limits: Limits) -> tuple[int, ...]:
    """A non-empty list of token ids, at most ``left`` of the request's ``max_token_ids``."""
    if not value:
        raise _empty(param)
    if len(value) > left:
        raise _invalid(
            param, f"too many token ids in the request (the limit is {limits.max_token_ids} in all)."
        )
    if set(map(type, value)) != {int}:  # C-speed type check; exact int excludes booleans
        i, bad = next((i, t) for i, t in enumerate(value) if not _is_int(t))
        raise _wrong_type(f"{param}[{i}]", "an integer token id", bad)
    if min(value) < 0 or max(value) >= TOKEN_ID_LIMIT:
        i = next(i for i, t in enumerate(value) if not 0 <= t < TOKEN_ID_LIMIT)
        raise _invalid(f"{param}[{i}]", f"a token id must be in [0, {TOKEN_ID_LIMIT - 1}].")
    return tuple(value)


def _is_int(value: object) -> bool:
    return type(value) is int


def _messages(obj: Mapping[str, Any], limits: Limits, budget: _TextBudget) -> tuple[Mapping[str, Any], ...]:
    messages = obj.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of objects", messages)
    if not messages:
        raise _empty("messages")
    _at_most(messages, "messages", limits.max_messages)
    return tuple(_message(m, f"messages[{i}]", budget) for i, m in enumerate(messages))


def _message(message: object, param: str, budget: _TextBudget) -> Mapping[str, Any]:
    if not isinstance(message, dict):
        raise _wrong_type(param, "an object", message)
    role = message.get("role")
    if role is None:
        raise _missing(f"{param}.role")
    if not isinstance(role, str):
        raise _wrong_type(f"{param}.role", "a string", role)
    for key in ("name", "tool_call_id"):
        if not isinstance(message.get(key, ""), str | None):
            raise _wrong_type(f"{param}.{key}", "a string", message[key])
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _wrong_type(f"{param}.tool_calls", "an array of objects", tool_calls)
        _objects(tool_calls, f"{param}.tool_calls")
    content = message.get("content")
    if isinstance(content, str):
        budget.add(content, f"{param}.content")
        return message
    if isinstance(content, list):
        _check_parts(content, f"{param}.content", budget)
        return message
    if content is not None:
        raise _wrong_type(f"{param}.content", "a string or an array of content parts", content)
    return message


def _check_parts(parts: list[Any], param: str, budget: _TextBudget) -> None:
    """Validate content parts and count their text (joined by ``"\\n"``, as vLLM flattens
    them for a string-content template); a bare string part is text (vLLM). The parts are
    kept as sent: ``tokenizer.vllm_conversation`` shapes them for the model's template."""
    texts: list[str] = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if isinstance(part, str):
            texts.append(part)
        elif not isinstance(part, dict):
            raise _wrong_type(where, "an object", part)
        else:
            kind = part.get("type")
            if kind is None:
                raise _missing(f"{where}.type")
            if not isinstance(kind, str):
                raise _wrong_type(f"{where}.type", "a string", kind)
            if kind == "text":
                text = part.get("text")
                if text is None:
                    raise _missing(f"{where}.text")
                if not isinstance(text, str):
                    raise _wrong_type(f"{where}.text", "a string", text)
                texts.append(text)
    budget.add("\n".join(texts), param)


def _objects(items: list[Any], param: str) -> tuple[Mapping[str, Any], ...]:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _wrong_type(f"{param}[{i}]", "an object", item)
    return tuple(items)


def _at_most(items: list[Any], param: str, limit: int) -> None:
    if len(items) > limit:
        raise _invalid(
            param,
            f"array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {len(items)} instead.",
        )


# -- errors (OpenAI's wording) -------------------------------------------------------------


def _missing(param: str) -> Rejection:
    return Rejection(ErrorKind.BAD_REQUEST, f"Missing required parameter: '{param}'.", param)


def _wrong_type(param: str, expected: str, value: object) -> Rejection:
    return Rejection(
        ErrorKind.BAD_REQUEST,
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param,
    )


def _invalid(param: str, why: str) -> Rejection:
    return Rejection(ErrorKind.BAD_REQUEST, f"Invalid '{param}': {why}", param)


def _empty(param: str) -> Rejection:
    return _invalid(
        param,
        "empty array. Expected an array with minimum length 1, but got an empty array instead.",
    )


def _json_type(value: object) -> str:
    """A JSON value's type name for messages (never its content)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _excerpt(text: str) -> str:
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
