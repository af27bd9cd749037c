"""The ext_proc service with the REAL picker over a real gRPC stream (after the Inference
Extension's hermetic test): Envoy's messages in, the exact answers out, in both body modes.

``test_protocol.py`` covers the protocol with a stand-in picker; ``test_picker.py`` the
picker without the protocol. Here the two are joined as the server joins them, with a real
index fed through its KV-event sink and the tiny tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from inference_cache.extproc import metrics, picking, protocol

from .test_picker import LONG, MODEL, A, B, cache_on, chat_ids, make_picker
from .test_protocol import Mode, close, config, read, request_body, request_headers, send

Open = Callable[..., Awaitable[Any]]


@pytest.fixture()
async def open_stream() -> AsyncIterator[Open]:
    """``await open_stream(**make_picker kwargs)`` -> (call, picker, index, metrics)."""
    cleanup: list[Any] = []

    async def open_(**kwargs: Any) -> Any:
        p, index = make_picker(**kwargs)
        m = metrics.ServerMetrics()
        server = grpc.aio.server()
        protocol.add_to_server(
            protocol.ExtProcService(p, protocol.ProtocolSettings(response_processing=True), m.extproc), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        cleanup.append((server, channel))
        return ep_grpc.ExternalProcessorStub(channel).Process(), p, index, m

    yield open_
    for server, channel in cleanup:
        await channel.close()
        await server.stop(None)


def chat(content: str, **fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


async def exchange(call: Any, mode: int, body: bytes, *, subset: list[str] | None = None) -> Any:
    """Envoy's side of one request in ``mode``; -> the answer that decides it."""
    await send(
        call,
        request_headers(path="/v1/chat/completions", protocol_config=config(mode), subset=subset),
    )
    if mode == Mode.BUFFERED:
        (headers_answer,) = await read(call, 1)
        assert headers_answer.WhichOneof("response") == "request_headers"
    half = len(body) // 2
    if mode == Mode.FULL_DUPLEX_STREAMED:
        await send(call, request_body(body[:half], end_of_stream=False), request_body(body[half:]))
    else:
        await send(call, request_body(body))
    (answer,) = await read(call, 1)
    if mode == Mode.FULL_DUPLEX_STREAMED and answer.HasField("request_headers"):
        (rest,) = await read(call, 1)  # the body, streamed back whole (it fits one chunk)
        assert rest.request_body.response.body_mutation.streamed_response.body == body
    return answer


def destination(answer: Any) -> str:
    common = (
        answer.request_body.response if answer.HasField("request_body") else answer.request_headers.response
    )
    (option,) = common.header_mutation.set_headers
    assert option.header.key == picking.DESTINATION_HEADER
    value = option.header.raw_value.decode()
    lb = answer.dynamic_metadata.fields[picking.LB_NAMESPACE].struct_value
    assert lb.fields[picking.DESTINATION_HEADER].string_value == value
    return value


MODES = [
    pytest.param(Mode.BUFFERED, id="buffered"),
    pytest.param(Mode.FULL_DUPLEX_STREAMED, id="full-duplex"),
]


@pytest.mark.parametrize("mode", MODES)
async def test_a_cached_prefix_is_routed_to_its_replica(open_stream: Open, mode: int) -> None:
    call, _p, index, m = await open_stream()
    cache_on(index, B, chat_ids(LONG))
    answer = await exchange(call, mode, chat(LONG))
    assert destination(answer) == B
    await close(call)
    label = "buffered" if mode == Mode.BUFFERED else "full-duplex"
    assert m.extproc.requests.labels(label, "routed")._value.get() == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("body", "subset", "status", "code"),
    [
        pytest.param(b"{oops", None, 400, None, id="bad-json"),
        pytest.param(json.dumps({"messages": []}).encode(), None, 400, None, id="missing-model"),
        pytest.param(
            json.dumps({"model": "x", "messages": [{"role": "user", "content": "q"}]}).encode(),
            None,
            404,
            "model_not_found",
            id="unknown-model",
        ),
        pytest.param(chat("q"), ["10.9.9.9:80"], 503, "no_ready_endpoint", id="subset-none-eligible"),
    ],
)
async def test_refusals_are_immediate_openai_errors(
    open_stream: Open, mode: int, body: bytes, subset: list[str] | None, status: int, code: str | None
) -> None:
    call, *_ = await open_stream()
    answer = await exchange(call, mode, body, subset=subset)
    assert answer.WhichOneof("response") == "immediate_response"
    immediate = answer.immediate_response
    assert immediate.status.code == status
    error = json.loads(immediate.body)["error"]
    assert error["code"] == code and error["message"]
    await close(call)


@pytest.mark.parametrize("mode", MODES)
async def test_the_subset_hint_limits_a_cached_prefix_to_the_subset(open_stream: Open, mode: int) -> None:
    call, *_, index, _m = await open_stream()
    cache_on(index, B, chat_ids(LONG))
    answer = await exchange(call, mode, chat(LONG), subset=[A])
    assert destination(answer) == A
    await close(call)


async def test_prediction_and_reported_usage_are_compared(open_stream: Open) -> None:
    m = metrics.ServerMetrics()
    ours = picking.Decision(endpoints=(A,), predicted_prompt_tokens=100, predicted_cached_tokens=64)
    m.extproc.usage(ours, picking.Usage(prompt_tokens=100, cached_tokens=48))
    m.extproc.usage(ours, picking.Usage(prompt_tokens=100, cached_tokens=64))
    m.extproc.usage(picking.Decision(endpoints=(A,)), picking.Usage(prompt_tokens=7))  # nothing predicted
    tokens = m.extproc.tokens
    assert tokens.labels("cached", "predicted")._value.get() == 128
    assert tokens.labels("cached", "reported")._value.get() == 112
    assert tokens.labels("prompt", "reported")._value.get() == 200
    assert m.extproc.prediction_mismatch.labels("cached")._value.get() == 1
    assert m.extproc.prediction_mismatch.labels("prompt")._value.get() == 0


async def test_the_servers_ext_proc_port_takes_bodies_over_grpcs_default_4_mib() -> None:
    """A 5 MB body reaches the picker (here: an unknown model, 404) instead of failing the
    stream at gRPC's default 4 MiB message limit (which Envoy turns into a 500)."""
    from inference_cache import config as config_mod
    from inference_cache.extproc import serve

    srv = serve.Server(config_mod.Config(server=config_mod.ServerSettings.loopback()))
    await srv.start()
    try:
        assert srv.addresses is not None
        async with grpc.aio.insecure_channel(
            srv.addresses.extproc, options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel:
            call = ep_grpc.ExternalProcessorStub(channel).Process()
            body = chat("x" * (5 * 1000 * 1000))
            answer = await exchange(call, Mode.BUFFERED, body)
            assert answer.immediate_response.status.code == 404
            await close(call)
    finally:
        await srv.stop(0)
