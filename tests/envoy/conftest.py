"""A real Envoy between an HTTP client and tiny engines, with an ext_proc endpoint picker.

What is real: the Envoy binary (``make envoy``) running a shipped ``examples/envoy/`` config
rewritten by :func:`inference_cache.envoy.loopback`, gRPC ext_proc over loopback, HTTP to
the engines. What is a stand-in: the picker (:class:`StubPicker`, a minimal ext_proc server
answering as ``protocols.md`` §4.3 describes, choosing whatever ``choose`` says) and the
engines (:class:`EchoEngine`, answering with their own name). The fixtures are meant to be
reused with the real server in place of the stub: ``engines`` and ``start_envoy`` know
nothing about the picker.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inference_cache import envoy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "envoy"
CONFIGS = {
    "buffered": EXAMPLES / "envoy-buffered.yaml",
    "duplex": EXAMPLES / "envoy-duplex.yaml",
    "override-host": EXAMPLES / "envoy-override-host.yaml",
}
DESTINATION = "x-gateway-destination-endpoint"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
#: Largest streamed_response chunk, as the Inference Extension's endpoint picker sends.
CHUNK = 62_000
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


# -- engines ---------------------------------------------------------------------------
@dataclass
class EchoEngine:
    """An HTTP "engine" answering every request with its name, the body size it received
    and the destination header it saw."""

    name: str
    address: str = ""
    requests: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        return web.json_response(
            {"engine": self.name, "body_bytes": len(body), "destination": request.headers.get(DESTINATION)}
        )


@pytest.fixture
async def engines() -> AsyncIterator[list[EchoEngine]]:
    """Two echo engines on 127.0.0.1 (``engine-1``, ``engine-2``)."""
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for name in ("engine-1", "engine-2"):
            engine = EchoEngine(name)
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", engine.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            engine.address = f"{host}:{port}"
            started.append(engine)
        yield started


# -- the stand-in picker ---------------------------------------------------------------
@dataclass
class Seen:
    """One HTTP request as the picker saw it."""

    headers: dict[str, str]
    body_bytes: int = 0
    body_mode: int | None = None
    #: The engine that answered (``upstream.address`` attribute of the response headers).
    served: str | None = None


@dataclass
class StubPicker(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """A minimal ext_proc endpoint picker: sends every request to ``choose`` (header with
    OVERWRITE + the same value in ``envoy.lb`` metadata), in the body mode Envoy announces
    in ``protocol_config`` (BUFFERED when absent), echoing response bodies in
    FULL_DUPLEX_STREAMED."""

    choose: str = ""
    address: str = ""
    seen: list[Seen] = field(default_factory=list)

    def _route(self) -> tuple[ep.CommonResponse, struct_pb2.Struct]:
        mutation = ep.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DESTINATION, raw_value=self.choose.encode()),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        )
        metadata = struct_pb2.Struct()
        metadata.update({"envoy.lb": {DESTINATION: self.choose}})
        return ep.CommonResponse(header_mutation=mutation, clear_route_cache=True), metadata

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        mode: int | None = None
        seen: Seen | None = None
        body = bytearray()
        routed = False
        async for request in request_iterator:
            if request.HasField("protocol_config"):
                mode = request.protocol_config.request_body_mode
            duplex = mode == FULL_DUPLEX
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                headers = {h.key: h.raw_value.decode() for h in request.request_headers.headers.headers}
                seen = Seen(headers=headers, body_mode=mode)
                self.seen.append(seen)
                if request.request_headers.end_of_stream:  # bodiless: decide now
                    common, metadata = self._route()
                    routed = True
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(response=common), dynamic_metadata=metadata
                    )
                elif not duplex:
                    yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
            elif kind == "request_body":
                if routed:  # Envoy may repeat the final chunk (envoy#46237): ignore
                    continue
                body += request.request_body.body
                if seen is not None:
                    seen.body_bytes = len(body)
                if not request.request_body.end_of_stream:
                    continue
                common, metadata = self._route()
                routed = True
                if duplex:
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(response=common), dynamic_metadata=metadata
                    )
                    for response in _streamed(bytes(body)):
                        yield response
                else:
                    yield ep.ProcessingResponse(
                        request_body=ep.BodyResponse(response=common), dynamic_metadata=metadata
                    )
            elif kind == "request_trailers":
                yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
            elif kind == "response_headers":
                attributes = request.attributes.get(EXTPROC_FILTER)
                if seen is not None and attributes is not None and "upstream.address" in attributes.fields:
                    seen.served = attributes.fields["upstream.address"].string_value
                yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            elif kind == "response_body":
                chunk = request.response_body
                mutation = ep.BodyMutation(
                    streamed_response=ep.StreamedBodyResponse(
                        body=chunk.body, end_of_stream=chunk.end_of_stream
                    )
                )
                common = ep.CommonResponse(body_mutation=mutation) if duplex else ep.CommonResponse()
                yield ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))
            elif kind == "response_trailers":
                yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def _streamed(body: bytes) -> list[ep.ProcessingResponse]:
    """The request body handed back as streamed_response chunks, the last with end_of_stream."""
    pieces = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
    return [
        ep.ProcessingResponse(
            request_body=ep.BodyResponse(
                response=ep.CommonResponse(
                    body_mutation=ep.BodyMutation(
                        streamed_response=ep.StreamedBodyResponse(
                            body=piece, end_of_stream=i == len(pieces) - 1
                        )
                    )
                )
            )
        )
        for i, piece in enumerate(pieces)
    ]


@pytest.fixture
async def picker(engines: list[EchoEngine]) -> AsyncIterator[StubPicker]:
    """The stub picker on 127.0.0.1, choosing engine #2, with gRPC health (SERVING)."""
    stub = StubPicker(choose=engines[1].address)
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(stub, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(EXTPROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stub.address = f"127.0.0.1:{port}"
    try:
        yield stub
    finally:
        await server.stop(grace=None)


# -- Envoy -----------------------------------------------------------------------------
StartEnvoy = Callable[..., Awaitable[envoy.EnvoyProcess]]


@pytest.fixture
async def start_envoy() -> AsyncIterator[StartEnvoy]:
    """``await start_envoy(name, extproc=..., engines=...)``: the shipped config ``name``
    (a key of ``CONFIGS``) on loopback with ephemeral ports, running until the test ends.
    ``engines`` are listed in configs with an ``engines`` cluster, unused by the others."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            name: str, *, extproc: str | Sequence[str], engines: Sequence[str] = ()
        ) -> envoy.EnvoyProcess:
            rewritten = envoy.loopback(envoy.load_config(CONFIGS[name]), extproc=extproc, engines=engines)
            return await stack.enter_async_context(envoy.EnvoyProcess(rewritten))

        yield start


def answer(body: bytes) -> dict[str, Any]:
    """An echo engine's JSON answer."""
    decoded: dict[str, Any] = json.loads(body)
    return decoded
