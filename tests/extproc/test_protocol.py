"""The ext_proc protocol over a real gRPC stream (after the Inference Extension's
hermetic test): a ``grpc.aio`` server on 127.0.0.1 runs ``ExtProcService`` with a fake
``Picker`` (records requests and ``finished`` calls, returns a canned result); the client
is ``ExternalProcessorStub.Process`` writing ``ProcessingRequest``s as Envoy would and
reading the exact ``ProcessingResponse``s. Nothing else is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from inference_cache.extproc import picking, protocol
from inference_cache.extproc.picking import Decision, ErrorKind, Outcome, PickRequest, Rejection, Usage

Mode = processing_mode_pb2.ProcessingMode.BodySendMode
OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
DEST = "10.0.0.2:8000"
BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()
READ_TIMEOUT_S = 10


class FakePicker:
    """Returns (or raises) ``result``; records every request and ``finished`` call."""

    def __init__(self, result: Decision | Rejection | Exception) -> None:
        self.result = result
        self.requests: list[PickRequest] = []
        self.finished_calls: list[tuple[Decision, Outcome]] = []
        self.finished_event = asyncio.Event()

    async def pick(self, request: PickRequest) -> Decision | Rejection:
        self.requests.append(request)
        if isinstance(self.result, Decision):
            return dataclasses.replace(self.result)
        if isinstance(self.result, Rejection):
            return self.result
        raise self.result

    def finished(self, decision: Decision, outcome: Outcome) -> None:
        self.finished_calls.append((decision, outcome))
        self.finished_event.set()

    async def wait_finished(self) -> tuple[Decision, Outcome]:
        await asyncio.wait_for(self.finished_event.wait(), READ_TIMEOUT_S)
        return self.finished_calls[-1]


class FakeObserver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int]] = []
        self.usages: list[tuple[Decision, Usage]] = []

    def request(self, *, mode: str, outcome: str, status: int) -> None:
        self.requests.append((mode, outcome, status))

    def usage(self, predicted: Decision, usage: Usage) -> None:
        self.usages.append((predicted, usage))


@dataclasses.dataclass
class Harness:
    picker: FakePicker
    observer: FakeObserver
    server: grpc.aio.Server
    channel: grpc.aio.Channel

    def open(self) -> Any:
        return ep_grpc.ExternalProcessorStub(self.channel).Process()


Start = Callable[..., Awaitable[Harness]]


@pytest.fixture()
async def start() -> AsyncIterator[Start]:
    """``await start(result, **settings)`` -> a server with a fake picker, and its channel."""
    started: list[Harness] = []

    async def start_(result: Decision | Rejection | Exception | None = None, **settings: Any) -> Harness:
        picker = FakePicker(Decision(endpoints=(DEST,)) if result is None else result)
        observer = FakeObserver()
        server = grpc.aio.server()
        service = protocol.ExtProcService(picker, protocol.ProtocolSettings(**settings), observer)
        protocol.add_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        harness = Harness(picker, observer, server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        started.append(harness)
        return harness

    yield start_
    for harness in started:
        await harness.channel.close()
        await harness.server.stop(None)


# --- Envoy's messages -----------------------------------------------------------------


def header_map(pairs: Iterable[tuple[str, str]]) -> Any:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])


def config(request: int, response: int = Mode.NONE) -> Any:
    return ep.ProtocolConfiguration(request_body_mode=request, response_body_mode=response)


def request_headers(
    *,
    method: str = "POST",
    path: str = "/v1/completions",
    extra: Iterable[tuple[str, str]] = (),
    end_of_stream: bool = False,
    protocol_config: Any = None,
    subset: list[str] | None = None,
) -> Any:
    pairs = [(":method", method), (":path", path), (":authority", "gw"), ("content-type", "application/json")]
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=header_map([*pairs, *extra]), end_of_stream=end_of_stream)
    )
    if protocol_config is not None:
        message.protocol_config.CopyFrom(protocol_config)
    if subset is not None:
        message.metadata_context.filter_metadata[picking.SUBSET_NAMESPACE].update(
            {picking.SUBSET_KEY: subset}
        )
    return message


def request_body(data: bytes, *, end_of_stream: bool = True) -> Any:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


def response_headers(
    *, status: int = 200, content_type: str = "application/json", served: str | None = None, eos: bool = False
) -> Any:
    pairs = [(":status", str(status)), ("content-type", content_type)]
    message = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(headers=header_map(pairs), end_of_stream=eos)
    )
    if served is not None:
        message.metadata_context.filter_metadata[picking.LB_NAMESPACE].update({picking.SERVED_KEY: served})
    return message


def response_body(data: bytes, *, end_of_stream: bool) -> Any:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- the exchange ---------------------------------------------------------------------


async def send(call: Any, *messages: Any) -> None:
    for message in messages:
        await call.write(message)


async def read(call: Any, count: int) -> list[Any]:
    return [await asyncio.wait_for(call.read(), READ_TIMEOUT_S) for _ in range(count)]


async def close(call: Any) -> None:
    """Half-close; the server must then end the stream cleanly with nothing more to say."""
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), READ_TIMEOUT_S) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


def assert_routed(common: Any, metadata: Any, destination: str = DEST) -> None:
    """The destination header (OVERWRITE, raw_value) and the same value in ``envoy.lb``."""
    (option,) = [o for o in common.header_mutation.set_headers if o.header.key == picking.DESTINATION_HEADER]
    assert option.header.raw_value == destination.encode()
    assert option.append_action == OVERWRITE
    assert json_format.MessageToDict(metadata) == {
        picking.LB_NAMESPACE: {picking.DESTINATION_HEADER: destination}
    }


def streamed(responses: list[Any], field: str = "request_body") -> tuple[bytes, list[bool]]:
    """Reassembled ``streamed_response`` body and the ``end_of_stream`` flags."""
    parts = [getattr(r, field).response.body_mutation.streamed_response for r in responses]
    return b"".join(p.body for p in parts), [p.end_of_stream for p in parts]


# --- request path: BUFFERED -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body_mode", "protocol_config"),
    [
        pytest.param("auto", None, id="auto-without-protocol-config"),
        pytest.param("buffered", None, id="buffered-setting"),
        pytest.param("auto", config(Mode.BUFFERED), id="auto-protocol-config"),
        pytest.param("full-duplex", config(Mode.BUFFERED), id="protocol-config-wins"),
    ],
)
async def test_buffered_routes_in_the_body_response(
    start: Start, body_mode: str, protocol_config: Any
) -> None:
    h = await start(body_mode=body_mode)
    call = h.open()
    await send(call, request_headers(protocol_config=protocol_config))
    (headers_answer,) = await read(call, 1)
    continue_ = ep.ProcessingResponse(request_headers=ep.HeadersResponse())  # empty CONTINUE
    if protocol_config is not None:
        # Envoy announced no response body: we ask it to skip the response headers too.
        continue_.mode_override.CopyFrom(protocol.SKIP_RESPONSE)
    assert headers_answer == continue_
    await send(call, request_body(BODY))
    (body_answer,) = await read(call, 1)
    assert body_answer.WhichOneof("response") == "request_body"
    assert_routed(body_answer.request_body.response, body_answer.dynamic_metadata)
    assert not body_answer.request_body.response.HasField("body_mutation")
    await close(call)

    (request,) = h.picker.requests
    assert (request.method, request.path, request.body, request.subset) == (
        "POST",
        "/v1/completions",
        BODY,
        None,
    )
    assert request.headers[":authority"] == "gw"
    decision, outcome = await h.picker.wait_finished()
    assert decision.endpoints == (DEST,)
    assert outcome == Outcome(response_complete=False)
    assert h.observer.requests == [("buffered", "routed", 0)]


async def test_buffered_replacement_body_and_length(start: Start) -> None:
    h = await start(Decision(endpoints=(DEST,), body=b'{"model":"m","prompt":[1,2]}'))
    call = h.open()
    await send(call, request_headers(), request_body(BODY))
    _, answer = await read(call, 2)
    common = answer.request_body.response
    assert common.body_mutation.body == b'{"model":"m","prompt":[1,2]}'
    lengths = [
        o.header.raw_value for o in common.header_mutation.set_headers if o.header.key == "content-length"
    ]
    assert lengths == [b"28"]
    await close(call)


# --- request path: FULL_DUPLEX_STREAMED -----------------------------------------------


@pytest.mark.parametrize(
    ("body_mode", "protocol_config"),
    [
        pytest.param("auto", config(Mode.FULL_DUPLEX_STREAMED), id="protocol-config"),
        pytest.param("full-duplex", None, id="setting-without-protocol-config"),
        pytest.param("buffered", config(Mode.FULL_DUPLEX_STREAMED), id="protocol-config-wins"),
    ],
)
async def test_duplex_answers_after_the_whole_split_body(
    start: Start, body_mode: str, protocol_config: Any
) -> None:
    h = await start(body_mode=body_mode)
    call = h.open()
    pieces = split(BODY, 7)
    await send(
        call,
        request_headers(protocol_config=protocol_config),
        *[request_body(p, end_of_stream=False) for p in pieces[:-1]],
        request_body(pieces[-1], end_of_stream=True),
    )
    # Nothing was answered before the end: the first answer is the routed headers response.
    headers_answer, body_answer = await read(call, 2)
    assert headers_answer.WhichOneof("response") == "request_headers"
    assert headers_answer.request_headers.response.clear_route_cache
    assert_routed(headers_answer.request_headers.response, headers_answer.dynamic_metadata)
    assert streamed([body_answer]) == (BODY, [True])
    await close(call)
    assert [r.body for r in h.picker.requests] == [BODY]
    assert h.observer.requests == [("full-duplex", "routed", 0)]


@pytest.mark.parametrize("replaced", [False, True], ids=["original", "replacement"])
async def test_duplex_one_megabyte_body_chunks(start: Start, replaced: bool) -> None:
    big = json.dumps({"model": "m", "prompt": "x" * (1 << 20)}).encode()
    new = (b'{"model":"m","prompt":"' + b"y" * (1 << 20) + b'"}') if replaced else None
    h = await start(Decision(endpoints=(DEST,), body=new), body_mode="full-duplex")
    call = h.open()
    pieces = split(big, 16 << 10)
    await send(
        call,
        request_headers(),
        *[request_body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)],
    )
    expected = new if new is not None else big
    count = -(-len(expected) // 62_000)
    headers_answer, *chunks = await read(call, 1 + count)
    body, ends = streamed(chunks)
    assert body == expected
    assert ends == [False] * (count - 1) + [True]
    assert all(len(c.request_body.response.body_mutation.streamed_response.body) <= 62_000 for c in chunks)
    lengths = [
        o.header.raw_value
        for o in headers_answer.request_headers.response.header_mutation.set_headers
        if o.header.key == "content-length"
    ]
    assert lengths == ([str(len(new)).encode()] if new is not None else [])
    assert h.picker.requests[0].body == big
    await close(call)


async def test_duplex_repeated_final_chunk_is_ignored(start: Start) -> None:
    h = await start(body_mode="full-duplex", response_processing=True)
    call = h.open()
    await send(call, request_headers(), request_body(BODY), request_body(BODY))  # envoy#46237
    await send(call, response_headers())
    answers = await read(call, 3)
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers",
        "request_body",
        "response_headers",
    ]
    assert len(h.picker.requests) == 1
    await close(call)


async def test_duplex_body_ended_by_trailers(start: Start) -> None:
    h = await start(body_mode="full-duplex")
    call = h.open()
    trailers = ep.ProcessingRequest(request_trailers=ep.HttpTrailers(trailers=header_map([("x-t", "1")])))
    await send(call, request_headers(), request_body(BODY[:5], end_of_stream=False))
    await send(call, request_body(BODY[5:], end_of_stream=False), trailers)
    headers_answer, body_answer, trailers_answer = await read(call, 3)
    assert_routed(headers_answer.request_headers.response, headers_answer.dynamic_metadata)
    assert streamed([body_answer]) == (BODY, [False])  # the trailers end the stream
    assert trailers_answer == ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    await close(call)


# --- bodiless requests and visible-body-less modes ------------------------------------


@pytest.mark.parametrize("body_mode", ["buffered", "full-duplex"])
async def test_get_is_routed_at_the_headers(start: Start, body_mode: str) -> None:
    h = await start(body_mode=body_mode)
    call = h.open()
    await send(call, request_headers(method="GET", path="/v1/models", end_of_stream=True))
    (answer,) = await read(call, 1)
    assert answer.WhichOneof("response") == "request_headers"
    assert_routed(answer.request_headers.response, answer.dynamic_metadata)
    await close(call)
    (request,) = h.picker.requests
    assert (request.method, request.body) == ("GET", b"")
    assert h.observer.requests == [("headers", "routed", 0)]


async def test_streamed_request_mode_routes_at_headers_and_passes_chunks(start: Start) -> None:
    h = await start()
    call = h.open()
    await send(call, request_headers(protocol_config=config(Mode.STREAMED)))
    (answer,) = await read(call, 1)
    assert_routed(answer.request_headers.response, answer.dynamic_metadata)
    await send(call, request_body(BODY, end_of_stream=True))
    assert await read(call, 1) == [ep.ProcessingResponse(request_body=ep.BodyResponse())]
    await close(call)


# --- request path: STREAMED, body sent without waiting for the headers answer ----------

STREAMED_NOW = ep.ProtocolConfiguration(
    request_body_mode=Mode.STREAMED,
    response_body_mode=Mode.NONE,
    send_body_without_waiting_for_header_response=True,
)


async def test_streamed_without_waiting_routes_after_the_body_in_one_round_trip(start: Start) -> None:
    h = await start()
    call = h.open()
    pieces = split(BODY, 9)
    tenant = [("x-inference-cache-tenant", "acme")]
    await send(
        call,
        request_headers(protocol_config=STREAMED_NOW, extra=tenant, subset=["10.0.0.2:8000"]),
        *[request_body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)],
    )
    # The headers answer waited for the whole body: it routes, then one empty answer per chunk.
    headers_answer, *chunk_answers = await read(call, 1 + len(pieces))
    assert headers_answer.WhichOneof("response") == "request_headers"
    assert headers_answer.request_headers.response.clear_route_cache
    assert not headers_answer.HasField("mode_override")  # Envoy ignores it in this mode
    assert_routed(headers_answer.request_headers.response, headers_answer.dynamic_metadata)
    assert chunk_answers == [ep.ProcessingResponse(request_body=ep.BodyResponse())] * len(pieces)
    await close(call)
    (request,) = h.picker.requests
    assert (request.body, request.subset, request.headers["x-inference-cache-tenant"]) == (
        BODY,
        ("10.0.0.2:8000",),
        "acme",
    )
    _, outcome = await h.picker.wait_finished()
    assert outcome == Outcome(response_complete=False)
    assert h.observer.requests == [("streamed", "routed", 0)]


async def test_streamed_without_waiting_replacement_body_goes_in_the_first_chunk(start: Start) -> None:
    new = b'{"model":"m","prompt":[1,2]}'
    h = await start(Decision(endpoints=(DEST,), body=new))
    call = h.open()
    await send(
        call,
        request_headers(protocol_config=STREAMED_NOW),
        request_body(BODY[:10], end_of_stream=False),
        request_body(BODY[10:20], end_of_stream=False),
        request_body(BODY[20:], end_of_stream=True),
    )
    headers_answer, *chunk_answers = await read(call, 4)
    lengths = [
        o.header.raw_value
        for o in headers_answer.request_headers.response.header_mutation.set_headers
        if o.header.key == "content-length"
    ]
    assert lengths == [str(len(new)).encode()]
    mutations = [a.request_body.response.body_mutation for a in chunk_answers]
    assert [m.WhichOneof("mutation") for m in mutations] == ["body", "clear_body", "clear_body"]
    assert mutations[0].body == new
    await close(call)


async def test_streamed_without_waiting_rejection_and_oversize(start: Start) -> None:
    h = await start(Rejection(ErrorKind.BAD_REQUEST, "nope"))
    call = h.open()
    await send(call, request_headers(protocol_config=STREAMED_NOW), request_body(BODY))
    (answer,) = await read(call, 1)
    assert_immediate(answer, Rejection(ErrorKind.BAD_REQUEST, "nope"))
    assert await asyncio.wait_for(call.read(), READ_TIMEOUT_S) is grpc.aio.EOF
    assert h.observer.requests == [("streamed", "bad_request", 400)]

    h = await start(max_body_bytes=1000)
    call = h.open()
    await send(call, request_headers(protocol_config=STREAMED_NOW))
    await send(
        call, request_body(b"x" * 600, end_of_stream=False), request_body(b"x" * 600, end_of_stream=False)
    )
    (answer,) = await read(call, 1)
    assert answer.immediate_response.status.code == 413
    assert h.picker.requests == []


# --- rejections -----------------------------------------------------------------------

REJECTIONS = [
    pytest.param(ErrorKind.BAD_REQUEST, 400, id="400"),
    pytest.param(ErrorKind.MODEL_NOT_FOUND, 404, id="404"),
    pytest.param(ErrorKind.NO_ENDPOINT, 503, id="503"),
    pytest.param(ErrorKind.SHED, 429, id="429"),
]


def assert_immediate(answer: Any, rejection: Rejection) -> None:
    immediate = answer.immediate_response
    assert answer.WhichOneof("response") == "immediate_response"
    assert immediate.status.code == rejection.status
    assert [(o.header.key, o.header.raw_value) for o in immediate.headers.set_headers] == [
        ("content-type", b"application/json")
    ]
    assert immediate.body == rejection.body()
    assert set(json.loads(immediate.body)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("how", ["returned", "raised"])
@pytest.mark.parametrize("body_mode", ["buffered", "full-duplex"])
@pytest.mark.parametrize(("kind", "status"), REJECTIONS)
async def test_rejection_is_an_immediate_response(
    start: Start, kind: ErrorKind, status: int, body_mode: str, how: str
) -> None:
    rejection = Rejection(kind, "nope", param="model")
    assert rejection.status == status
    h = await start(
        rejection if how == "returned" else Rejection(kind, "nope", param="model"), body_mode=body_mode
    )
    call = h.open()
    await send(call, request_headers(), request_body(BODY))
    answers = await read(call, 2 if body_mode == "buffered" else 1)
    assert_immediate(answers[-1], rejection)
    # Processing is over: the server ends the stream by itself.
    assert await asyncio.wait_for(call.read(), READ_TIMEOUT_S) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert h.picker.finished_calls == []
    assert h.observer.requests == [(body_mode, kind.value, status)]


@pytest.mark.parametrize("body_mode", ["buffered", "full-duplex"])
async def test_oversize_body_is_413_without_picking(start: Start, body_mode: str) -> None:
    h = await start(body_mode=body_mode, max_body_bytes=1000)
    call = h.open()
    await send(call, request_headers())
    if body_mode == "buffered":
        await read(call, 1)
        await send(call, request_body(b"x" * 1001))
    else:  # refused as soon as the limit is passed, before the end of the body
        await send(
            call, request_body(b"x" * 600, end_of_stream=False), request_body(b"x" * 600, end_of_stream=False)
        )
    (answer,) = await read(call, 1)
    assert_immediate(answer, Rejection(ErrorKind.TOO_LARGE, "request body exceeds 1000 bytes"))
    assert answer.immediate_response.status.code == 413
    assert await asyncio.wait_for(call.read(), READ_TIMEOUT_S) is grpc.aio.EOF
    assert h.picker.requests == []


async def test_picker_exception_is_500_and_the_server_keeps_serving(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start(RuntimeError("boom"))
    call = h.open()
    with caplog.at_level(logging.ERROR, logger="inference_cache.extproc.protocol"):
        await send(call, request_headers(), request_body(BODY))
        _, answer = await read(call, 2)
    assert answer.immediate_response.status.code == 500
    assert json.loads(answer.immediate_response.body)["error"]["type"] == "internal_error"
    assert "boom" not in answer.immediate_response.body.decode()  # no internals to the client
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert await asyncio.wait_for(call.read(), READ_TIMEOUT_S) is grpc.aio.EOF

    h.picker.result = Decision(endpoints=(DEST,))
    call = h.open()
    await send(call, request_headers(), request_body(BODY))
    _, answer = await read(call, 2)
    assert_routed(answer.request_body.response, answer.dynamic_metadata)
    await close(call)
    assert h.observer.requests == [("buffered", "internal", 500), ("buffered", "routed", 0)]


# --- endpoint-picker protocol details -------------------------------------------------


@pytest.mark.parametrize(
    ("subset", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param(["10.0.0.2:8000"], ("10.0.0.2:8000",), id="partial"),
        pytest.param(["10.0.0.1:8000", "10.0.0.2:8000"], ("10.0.0.1:8000", "10.0.0.2:8000"), id="all"),
        pytest.param([], (), id="empty"),
    ],
)
async def test_subset_hint_reaches_the_picker(
    start: Start, subset: list[str] | None, expected: tuple[str, ...] | None
) -> None:
    h = await start(body_mode="full-duplex")
    call = h.open()
    await send(call, request_headers(subset=subset), request_body(BODY))
    await read(call, 2)
    await close(call)
    assert h.picker.requests[0].subset == expected


@pytest.mark.parametrize("body_mode", ["buffered", "full-duplex"])
async def test_client_sent_destination_header_never_survives(start: Start, body_mode: str) -> None:
    h = await start(Decision(endpoints=(DEST, "10.0.0.3:8000")), body_mode=body_mode)
    call = h.open()
    spoofed = [(picking.DESTINATION_HEADER, "6.6.6.6:1")]
    await send(call, request_headers(extra=spoofed), request_body(BODY))
    answers = await read(call, 2)
    routed = answers[1] if body_mode == "buffered" else answers[0]
    common = routed.request_body.response if body_mode == "buffered" else routed.request_headers.response
    # Our value, with OVERWRITE (the default APPEND would keep the client's copy).
    assert_routed(common, routed.dynamic_metadata, destination=f"{DEST},10.0.0.3:8000")
    await close(call)


# --- response path --------------------------------------------------------------------

USAGE = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
EXPECTED_USAGE = Usage(prompt_tokens=40, completion_tokens=3, cached_tokens=32)


async def route(h: Harness, protocol_config: Any) -> Any:
    call = h.open()
    await send(call, request_headers(protocol_config=protocol_config), request_body(BODY))
    await read(call, 2)
    return call


async def test_json_response_usage_reaches_finished(start: Start) -> None:
    h = await start(Decision(endpoints=(DEST,), predicted_prompt_tokens=40), response_processing=True)
    call = await route(h, config(Mode.BUFFERED, Mode.BUFFERED))
    body = json.dumps({"choices": [{"text": "ok"}], "usage": USAGE}).encode()
    await send(call, response_headers(served=DEST), response_body(body, end_of_stream=True))
    headers_answer, body_answer = await read(call, 2)
    assert headers_answer == ep.ProcessingResponse(response_headers=ep.HeadersResponse())
    assert body_answer == ep.ProcessingResponse(response_body=ep.BodyResponse())
    decision, outcome = await h.picker.wait_finished()
    assert decision.predicted_prompt_tokens == 40
    assert outcome == Outcome(response_complete=True, status=200, served=DEST, usage=EXPECTED_USAGE)
    assert [(d.predicted_prompt_tokens, u) for d, u in h.observer.usages] == [(40, EXPECTED_USAGE)]
    await close(call)
    assert len(h.picker.finished_calls) == 1


@pytest.mark.parametrize(
    ("settings", "response_body", "skipped"),
    [
        pytest.param({}, Mode.NONE, True, id="idle-response"),
        pytest.param({"skip_idle_response_headers": False}, Mode.NONE, False, id="setting-off"),
        pytest.param({"debug_header": True}, Mode.NONE, False, id="debug-header-needs-them"),
        pytest.param({}, Mode.BUFFERED, False, id="response-body-processed"),
    ],
)
async def test_response_headers_are_skipped_only_when_idle(
    start: Start, settings: dict[str, Any], response_body: int, skipped: bool
) -> None:
    h = await start(**settings)
    call = h.open()
    await send(call, request_headers(protocol_config=config(Mode.BUFFERED, response_body)))
    (headers_answer,) = await read(call, 1)
    assert headers_answer.HasField("mode_override") is skipped
    await close(call)


async def test_served_endpoint_from_the_upstream_address_attribute(start: Start) -> None:
    """Plain Envoy never fills ``-served``: ``response_attributes: [upstream.address]``
    (our shipped configs) reports it on the response headers instead."""
    h = await start(Decision(endpoints=(DEST,)))
    call = await route(h, config(Mode.BUFFERED, Mode.NONE))
    message = response_headers(eos=True)
    message.attributes[protocol.EXTPROC_FILTER].update({"upstream.address": "10.0.0.9:8000"})
    await send(call, message)
    await read(call, 1)
    _, outcome = await h.picker.wait_finished()
    assert outcome.served == "10.0.0.9:8000"
    await close(call)


async def test_json_response_split_in_streamed_mode(start: Start) -> None:
    h = await start(response_processing=True)
    call = await route(h, config(Mode.BUFFERED, Mode.STREAMED))
    pieces = split(json.dumps({"usage": USAGE}).encode(), 10)
    await send(call, response_headers(content_type="application/json; charset=utf-8"))
    await send(call, *[response_body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)])
    answers = await read(call, 1 + len(pieces))
    assert answers[1:] == [ep.ProcessingResponse(response_body=ep.BodyResponse())] * len(pieces)
    _, outcome = await h.picker.wait_finished()
    assert outcome.usage == EXPECTED_USAGE
    await close(call)


async def test_sse_response_usage_duplex_echoes_every_chunk(start: Start) -> None:
    h = await start(response_processing=True)
    call = await route(h, config(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED))
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\r\n\r\n'
        + b'data: {"choices":[],"usage":'
        + json.dumps(USAGE).encode()
        + b"}\r\n\r\ndata: [DONE]\r\n\r\n"
    )
    pieces = split(stream, 13)
    await send(call, response_headers(content_type="text/event-stream", served="10.0.0.9:8000"))
    await send(call, *[response_body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)])
    headers_answer, *echo = await read(call, 1 + len(pieces))
    assert headers_answer.WhichOneof("response") == "response_headers"
    assert [streamed([e], "response_body")[0] for e in echo] == pieces  # echoed at once, unchanged
    assert streamed(echo, "response_body")[1] == [False] * (len(pieces) - 1) + [True]
    _, outcome = await h.picker.wait_finished()
    assert outcome == Outcome(
        response_complete=True, status=200, served="10.0.0.9:8000", usage=EXPECTED_USAGE
    )
    await send(call, response_body(pieces[-1], end_of_stream=True))  # repeated final chunk: not echoed
    await close(call)
    assert len(h.picker.finished_calls) == 1


async def test_response_processing_off_reads_no_usage_but_settles_at_response_end(start: Start) -> None:
    h = await start()
    call = await route(h, config(Mode.BUFFERED, Mode.BUFFERED))
    await send(
        call,
        response_headers(status=503),
        response_body(json.dumps({"usage": USAGE}).encode(), end_of_stream=True),
    )
    await read(call, 2)
    _, outcome = await h.picker.wait_finished()
    assert outcome == Outcome(response_complete=True, status=503, served=None, usage=None)
    assert h.observer.usages == []
    await close(call)


async def test_response_trailers_end_the_response(start: Start) -> None:
    h = await start(response_processing=True)
    call = await route(h, config(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED))
    trailers = ep.ProcessingRequest(response_trailers=ep.HttpTrailers())
    await send(
        call, response_headers(), response_body(json.dumps({"usage": USAGE}).encode(), end_of_stream=False)
    )
    await send(call, trailers)
    answers = await read(call, 3)
    assert answers[2] == ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
    _, outcome = await h.picker.wait_finished()
    assert outcome.response_complete and outcome.usage == EXPECTED_USAGE
    await close(call)


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
async def test_debug_decision_header_only_when_enabled(start: Start, enabled: bool) -> None:
    h = await start(Decision(endpoints=(DEST,), debug="prefix=96/120"), debug_header=enabled)
    call = await route(h, config(Mode.BUFFERED, Mode.NONE))
    await send(call, response_headers(eos=True))
    (answer,) = await read(call, 1)
    options = answer.response_headers.response.header_mutation.set_headers
    expected = [(picking.DECISION_HEADER, b"prefix=96/120", OVERWRITE)] if enabled else []
    assert [(o.header.key, o.header.raw_value, o.append_action) for o in options] == expected
    _, outcome = await h.picker.wait_finished()
    assert outcome == Outcome(response_complete=True, status=200)
    await close(call)


# --- finished exactly once ------------------------------------------------------------


async def test_finished_once_when_the_client_cancels(start: Start) -> None:
    h = await start(response_processing=True)
    call = await route(h, config(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED))
    await send(call, response_headers(content_type="text/event-stream", served=DEST))
    await read(call, 1)
    await send(call, response_body(b'data: {"usage": {"prompt_tokens": 5}}\n\n', end_of_stream=False))
    await read(call, 1)
    call.cancel()
    _, outcome = await h.picker.wait_finished()
    assert outcome == Outcome(response_complete=False, status=200, served=DEST, usage=Usage(prompt_tokens=5))
    await h.server.stop(None)  # every handler has ended: no second call can still come
    assert len(h.picker.finished_calls) == 1


async def test_abandoned_before_routing_is_reported_without_finished(start: Start) -> None:
    h = await start(body_mode="full-duplex")
    call = h.open()
    await send(call, request_headers(), request_body(BODY[:3], end_of_stream=False))
    await close(call)
    await h.server.stop(None)
    assert h.picker.requests == []
    assert h.picker.finished_calls == []
    assert h.observer.requests == [("full-duplex", "abandoned", 0)]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="body_mode"):
        protocol.ProtocolSettings(body_mode="streamed")
    with pytest.raises(ValueError, match="positive"):
        protocol.ProtocolSettings(chunk_bytes=0)


def test_subset_hint_as_a_comma_string() -> None:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[picking.SUBSET_NAMESPACE].update({picking.SUBSET_KEY: "a:1, b:2"})
    assert protocol.subset_hint(metadata) == ("a:1", "b:2")
    empty = base_pb2.Metadata()
    assert protocol.subset_hint(empty) is None
    assert protocol.served_endpoint(empty) is None
    assert empty.filter_metadata == {}  # reading did not insert the namespaces
