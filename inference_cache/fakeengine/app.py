"""The OpenAI-compatible HTTP face of the simulated engine (aiohttp).

Owner: ``inference_cache.fakeengine``; clients, routers and the ``enginestats`` scraper talk
to it as they would to ``vllm serve``. Requests become token ids (``tokenize``), run through
the time model (``scheduler``), and come back as vLLM-shaped JSON or SSE. Every response
carries ``x-engine-address: <ip:port>`` (the local address of the connection) so a test can
see which replica a router picked. Streams are written chunk by chunk with ``TCP_NODELAY``
so no chunk waits in a buffer. ``POST /_fault`` (loopback clients only) injects faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference_cache.fakeengine.hashing import LoRA
from inference_cache.fakeengine.publisher import ZmqPublisher
from inference_cache.fakeengine.scheduler import Admission, Engine, RequestRejected
from inference_cache.tokenizer import PromptTokenizer, TemplateError, vllm_chat_tokens

log = logging.getLogger(__name__)

#: Generated text: these words' tokens, cycled.
FILLER = " the cache keeps every token it has seen and serves it again"
DEFAULT_MAX_TOKENS = 16
LOOPBACK = frozenset({"127.0.0.1", "::1"})


@dataclass(frozen=True)
class Served:
    """What the replica serves and how it describes itself."""

    model: str
    max_model_len: int = 4096
    loras: Mapping[str, LoRA] = field(default_factory=dict)
    cache_config: Mapping[str, str] = field(default_factory=dict)
    """Labels of ``vllm:cache_config_info``."""


@dataclass
class State:
    served: Served
    tokenizer: PromptTokenizer
    engine: Engine
    publisher: ZmqPublisher | None
    filler: list[int] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


STATE: web.AppKey[State] = web.AppKey("state", State)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.status}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _engine_address(request: web.Request, handler: Handler) -> web.StreamResponse:
    address = _address(request)
    try:
        response = await handler(request)
    except ApiError as e:
        response = e.response()
    except web.HTTPException as e:
        e.headers["x-engine-address"] = address
        raise
    if not response.prepared:
        response.headers["x-engine-address"] = address
    return response


def _address(request: web.Request) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return f"{sockname[0]}:{sockname[1]}" if sockname else ""


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _lora(state: State, body: Mapping[str, Any]) -> LoRA | None:
    model = body.get("model") or state.served.model
    if model == state.served.model:
        return None
    if model in state.served.loras:
        return state.served.loras[model]
    raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")


def _prompts(state: State, body: Mapping[str, Any]) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of those."""
    prompt = body.get("prompt")
    add_special = bool(body.get("add_special_tokens", True))
    if isinstance(prompt, str):
        return [state.tokenizer.encode(prompt, add_special_tokens=add_special)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [state.tokenizer.encode(p, add_special_tokens=add_special) for p in prompt]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings or a list of token ids")


def _chat_tokens(state: State, body: Mapping[str, Any]) -> list[int]:
    try:
        return vllm_chat_tokens(state.tokenizer, body)
    except TemplateError as e:
        raise ApiError(400, str(e)) from e


def _max_tokens(state: State, body: Mapping[str, Any], prompt_len: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = state.served.max_model_len - prompt_len
    if value is None:
        value = DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or value < 1:
        raise ApiError(400, "max_tokens must be a positive integer")
    if value > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {state.served.max_model_len} tokens. However, you "
            f"requested {prompt_len + value} tokens ({prompt_len} in the messages, "
            f"{value} in the completion).",
        )
    return value


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError(400, "cache_salt must be a non-empty string")
    return salt


def _usage(admission: Admission, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": admission.num_prompt_tokens,
        "total_tokens": admission.num_prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": admission.num_cached_tokens},
    }


def _add_usage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": a["prompt_tokens"] + b["prompt_tokens"],
        "total_tokens": a["total_tokens"] + b["total_tokens"],
        "completion_tokens": a["completion_tokens"] + b["completion_tokens"],
        "prompt_tokens_details": {
            "cached_tokens": a["prompt_tokens_details"]["cached_tokens"]
            + b["prompt_tokens_details"]["cached_tokens"]
        },
    }


@dataclass(frozen=True)
class _Job:
    prompt: list[int]
    output: list[int]
    lora: LoRA | None
    cache_salt: str | None


def _jobs(state: State, body: Mapping[str, Any], prompts: Sequence[list[int]]) -> list[_Job]:
    lora, salt = _lora(state, body), _cache_salt(body)
    jobs = []
    for prompt in prompts:
        n = _max_tokens(state, body, len(prompt))
        try:
            state.engine.check(len(prompt), n)  # before a stream starts
        except RequestRejected as e:
            raise ApiError(400, str(e)) from e
        output = [state.filler[i % len(state.filler)] for i in range(n)]
        jobs.append(_Job(prompt, output, lora, salt))
    return jobs


async def _run(state: State, job: _Job) -> AsyncGenerator[Admission | int, None]:
    try:
        async with contextlib.aclosing(
            state.engine.generate(
                job.prompt, output_token_ids=job.output, lora=job.lora, cache_salt=job.cache_salt
            )
        ) as steps:
            async for step in steps:
                yield step
    except RequestRejected as e:
        raise ApiError(400, str(e)) from e


async def _collect(state: State, job: _Job) -> tuple[Admission, list[int]]:
    admission: Admission | None = None
    tokens: list[int] = []
    async with contextlib.aclosing(_run(state, job)) as steps:
        async for step in steps:
            if isinstance(step, Admission):
                admission = step
            else:
                tokens.append(step)
    assert admission is not None
    return admission, tokens


async def _start_sse(request: web.Request) -> web.StreamResponse:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    response.headers["x-engine-address"] = _address(request)
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, data: Mapping[str, Any] | str) -> None:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    await response.write(f"data: {text}\n\n".encode())


def _model_name(state: State, body: Mapping[str, Any]) -> str:
    return str(body.get("model") or state.served.model)


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _json(request)
    jobs = _jobs(state, body, _prompts(state, body))
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), _model_name(state, body)
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    if not body.get("stream"):
        async with asyncio.TaskGroup() as group:  # one failure cancels the siblings
            tasks = [group.create_task(_collect(state, job)) for job in jobs]
        results = [t.result() for t in tasks]
        choices, usage = [], None
        for index, (admission, tokens) in enumerate(results):
            choices.append(
                {
                    "index": index,
                    "text": state.tokenizer.decode(tokens),
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            )
            one = _usage(admission, len(tokens))
            usage = one if usage is None else _add_usage(usage, one)
        return web.json_response({**head, "choices": choices, "usage": usage})
    response = await _start_sse(request)
    total: dict[str, Any] | None = None
    for index, job in enumerate(jobs):
        admitted: Admission | None = None
        async with contextlib.aclosing(_run(state, job)) as steps:
            async for step in steps:
                if isinstance(step, Admission):
                    admitted = step
                    continue
                choice = {"index": index, "text": state.tokenizer.decode([step]), "logprobs": None}
                await _send(
                    response,
                    {**head, "choices": [{**choice, "finish_reason": None, "stop_reason": None}]},
                )
        await _send(
            response,
            {
                **head,
                "choices": [
                    {
                        "index": index,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
            },
        )
        assert admitted is not None
        one = _usage(admitted, len(job.output))
        total = one if total is None else _add_usage(total, one)
    if _include_usage(body):
        await _send(response, {**head, "choices": [], "usage": total})
    await _send(response, "[DONE]")
    await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _json(request)
    (job,) = _jobs(state, body, [_chat_tokens(state, body)])
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), _model_name(state, body)
    head = {"id": rid, "object": "chat.completion", "created": created, "model": model}
    if not body.get("stream"):
        admission, tokens = await _collect(state, job)
        message = {"role": "assistant", "content": state.tokenizer.decode(tokens), "tool_calls": []}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        return web.json_response({**head, "choices": [choice], "usage": _usage(admission, len(tokens))})
    head["object"] = "chat.completion.chunk"
    response = await _start_sse(request)
    admitted: Admission | None = None
    role_sent = False

    async def delta(content: dict[str, Any]) -> None:
        choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": None}
        await _send(response, {**head, "choices": [choice]})

    async with contextlib.aclosing(_run(state, job)) as steps:
        async for step in steps:
            if isinstance(step, Admission):
                admitted = step
                continue
            # As vLLM: the role chunk goes out with the first step's output (after prefill),
            # so a client timing the first chunk measures the time to first token.
            if not role_sent:
                await delta({"role": "assistant", "content": ""})
                role_sent = True
            await delta({"content": state.tokenizer.decode([step])})
    await _send(
        response,
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": ""},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            ],
        },
    )
    if _include_usage(body):
        assert admitted is not None
        await _send(response, {**head, "choices": [], "usage": _usage(admitted, len(job.output))})
    await _send(response, "[DONE]")
    await response.write_eof()
    return response


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json(request)
    _lora(state, body)
    if "messages" in body:
        tokens = _chat_tokens(state, body)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        tokens = state.tokenizer.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))
    strs = state.tokenizer.token_strs(tokens) if body.get("return_token_strs") else None
    return web.json_response(
        {
            "count": len(tokens),
            "max_model_len": state.served.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }
    )


def _render_one(state: State, body: Mapping[str, Any], tokens: list[int]) -> dict[str, Any]:
    """vLLM's ``GenerateRequest`` shape, what ``/inference/v1/generate`` would accept."""
    return {
        "request_id": uuid.uuid4().hex,
        "token_ids": tokens,
        "features": None,
        "sampling_params": {"max_tokens": _max_tokens(state, body, len(tokens))},
        "model": _model_name(state, body),
        "stream": bool(body.get("stream", False)),
        "cache_salt": _cache_salt(body),
    }


async def render_completions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json(request)
    _lora(state, body)
    return web.json_response([_render_one(state, body, p) for p in _prompts(state, body)])


async def render_chat(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json(request)
    _lora(state, body)
    return web.json_response(_render_one(state, body, _chat_tokens(state, body)))


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    served = state.served

    def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": served.max_model_len,
            "permission": [],
        }

    data = [card(served.model, served.model, None)]
    data += [card(name, lora.path, served.model) for name, lora in served.loras.items()]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


class _Collector(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> list[Metric]:
        state, engine = self.state, self.state.engine
        labels = {"engine": "0", "model_name": state.served.model}
        names, values = list(labels), list(labels.values())
        stats = engine.cache.stats()

        def gauge(name: str, doc: str, value: float) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["engine", *state.served.cache_config],
        )
        info.add_metric(["0", *state.served.cache_config.values()], 1.0)
        return [
            gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                engine.num_running,
            ),
            gauge(
                "vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.num_waiting
            ),
            gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.usage),
            counter(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                stats.queries,
            ),
            counter(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                stats.hits,
            ),
            info,
        ]


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(request.app[STATE]))
    return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """Like vLLM's, but a refusal (blocks still in use) is a 409 rather than a silent 200."""
    if not request.app[STATE].engine.reset_prefix_cache():
        raise ApiError(409, "the prefix cache cannot be reset while requests hold blocks", "ConflictError")
    return web.Response(status=200)


async def fault(request: web.Request) -> web.Response:
    """Test-only switches, for loopback clients: ``drop_batches``, ``restart_publisher``, ``stall_s``."""
    if request.remote not in LOOPBACK:
        raise ApiError(403, "faults are accepted from loopback only", "ForbiddenError")
    state = request.app[STATE]
    body = await _json(request)
    unknown = set(body) - {"drop_batches", "restart_publisher", "stall_s"}
    if unknown:
        raise ApiError(400, f"unknown fault(s): {sorted(unknown)}")
    drop, restart, stall = body.get("drop_batches"), body.get("restart_publisher"), body.get("stall_s")
    if drop is not None and (not isinstance(drop, int) or drop < 0):
        raise ApiError(400, "drop_batches must be a non-negative integer")
    if stall is not None and (not isinstance(stall, int | float) or stall < 0):
        raise ApiError(400, "stall_s must be a non-negative number")
    if (drop or restart) and state.publisher is None:
        raise ApiError(400, "no KV events publisher (--kv-events-endpoint)")
    if state.publisher is not None:
        if restart:
            state.engine.reset_prefix_cache(force=True)
            state.publisher.restart()
        if drop:
            state.publisher.drop_next(drop)
    if stall:
        state.engine.stall(float(stall))
    return web.json_response({"ok": True})


def build_app(state: State) -> web.Application:
    if not state.filler:
        state.filler = state.tokenizer.encode(FILLER, add_special_tokens=False)
    app = web.Application(middlewares=[_engine_address])
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions/render", render_completions)
    app.router.add_post("/v1/chat/completions/render", render_chat)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post("/_fault", fault)
    return app
