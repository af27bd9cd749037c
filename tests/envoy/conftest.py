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

import asyncio
import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inference_cache import config as config_mod
from inference_cache import envoy
from inference_cache.extproc.openai import Limits
from inference_cache.extproc.scoring import ScoringSettings
from inference_cache.extproc.serve import Server
from inference_cache.fakeengine import main as fakeengine
from inference_cache.fakeengine.scheduler import TimeModel

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


# -- a fleet: fake engines, our server(s), a real Envoy ----------------------------------

REPO = Path(__file__).resolve().parents[2]
QWEN = REPO / ".cache" / "tokenizers" / "qwen"
MODEL = "e2e-model"
BS = 16
SYNC_S = 10.0
DECISION_HEADER = "x-inference-cache-decision"
SYSTEM = (
    "[{team}] You are a meticulous assistant for the {team} team. Follow the house style, cite the runbook "
    "section you rely on, and never invent numbers. Context for this conversation: {topic}. "
)


def conversation(i: int, turns: int = 1) -> list[dict[str, str]]:
    """A chat whose long system prompt is unique to ``i`` (a cold prefix per ``i``)."""
    system = SYSTEM.format(team=f"team-{i}", topic=" ".join(f"fact-{i}-{k}" for k in range(60)))
    messages = [{"role": "system", "content": system}]
    for t in range(turns):
        if t:
            messages.append({"role": "assistant", "content": f"Answer {t} for {i}."})
        messages.append({"role": "user", "content": f"Question {t} about item {i}?"})
    return messages


@dataclass
class Reply:
    status: int
    engine: str
    prompt_tokens: int
    cached_tokens: int
    decision: dict[str, Any] | None
    body: dict[str, Any]


@dataclass
class Fleet:
    engines: list[fakeengine.Running]
    servers: list[Server]
    proxy: envoy.EnvoyProcess
    session: aiohttp.ClientSession
    stack: contextlib.AsyncExitStack = field(repr=False)
    #: The engines serve replay (``start_fleet(replay=False)``: they do not).
    replay: bool = True

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.engines[i].port}"

    async def chat(
        self, messages: Sequence[Mapping[str, str]], *, headers: Mapping[str, str] | None = None, **body: Any
    ) -> Reply:
        payload = {"model": MODEL, "messages": list(messages), "max_tokens": 1, **body}
        async with self.session.post(
            self.proxy.url + "/v1/chat/completions", json=payload, headers=dict(headers or {})
        ) as response:
            data = await response.json(content_type=None)
            usage = data.get("usage") or {}
            decision = response.headers.get(DECISION_HEADER)
            return Reply(
                status=response.status,
                engine=response.headers.get("x-engine-address", ""),
                prompt_tokens=usage.get("prompt_tokens", 0),
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                decision=json.loads(decision) if decision else None,
                body=data,
            )

    async def start_server(self, i: int) -> Server:
        """A new server in place of ``servers[i]`` (stopped first by the caller), from the
        same config and on the same ext_proc port, so Envoy's cluster reaches it again."""
        old = self.servers[i]
        assert old.addresses is not None
        cfg = dataclasses.replace(
            old.config,
            server=dataclasses.replace(old.config.server, extproc_bind_address=old.addresses.extproc),
        )
        srv = Server(cfg)
        await srv.start()
        self.stack.push_async_callback(srv.stop, 0)
        self.servers[i] = srv
        return srv

    def lagging(self) -> list[str]:
        """Engines whose published KV-event batches some live server has not applied."""
        out = []
        for server in self.servers:
            if server.addresses is None:
                continue
            applied = {w.replica_id: w.counters.batches for w in server.workers}
            for i, e in enumerate(self.engines):
                assert e.publisher is not None
                if applied.get(self.address(i), -1) != e.publisher.next_seq:
                    out.append(self.address(i))
        return out

    async def sync(self) -> None:
        """Until every live server applied every batch (bounded; polls a real condition)."""
        deadline = time.monotonic() + SYNC_S
        while lagging := self.lagging():
            assert time.monotonic() < deadline, f"KV events of {lagging} never reached the server"
            await asyncio.sleep(0.005)

    async def connect(self) -> None:
        """Until each subscriber saw a live batch (ZMQ slow joiner): ping the engines with
        ``/reset_prefix_cache`` (an ``AllBlocksCleared`` batch) until all are applied."""
        deadline = time.monotonic() + SYNC_S
        while True:
            silent = [i for i, e in enumerate(self.engines) if e.publisher and e.publisher.next_seq == 0]
            if not silent and not self.lagging():
                return
            if (
                not silent
                and not self.replay
                and all(w.counters.batches for s in self.servers for w in s.workers)
            ):
                return  # without replay the batches missed before joining never arrive
            assert time.monotonic() < deadline, "no KV events reached the server"
            for i in range(len(self.engines)):
                async with self.session.post(self.engines[i].url + "/reset_prefix_cache") as r:
                    await r.read()
            await asyncio.sleep(0.05)


StartFleet = Callable[..., Awaitable[Fleet]]


def server_config(
    engines: Sequence[fakeengine.Running],
    *,
    metrics: bool,
    limits: Limits | None = None,
    scoring: ScoringSettings | None = None,
    matching: str = "tokens",
    **server: Any,
) -> config_mod.Config:
    settings = config_mod.ServerSettings.loopback(**{"debug_decision_header": True, **server})
    cfg = config_mod.Config(
        server=settings,
        models=(config_mod.ModelConfig(name=MODEL, block_size=BS, tokenizer=str(QWEN), matching=matching),),
        endpoints=tuple(
            config_mod.EndpointConfig(
                address=f"127.0.0.1:{e.port}",
                model=MODEL,
                kv_events=e.config.kv_events_endpoint or "",
                replay=e.config.replay_endpoint,
                metrics_url=f"{e.url}/metrics" if metrics else None,
            )
            for e in engines
        ),
        health_interval_s=0.5,
        stats_interval_s=0.1,
        limits=limits or Limits(),
        scoring=scoring or ScoringSettings(),
    )
    config_mod.validate(cfg)
    return cfg


@pytest.fixture
async def start_fleet() -> AsyncIterator[StartFleet]:
    """``await start_fleet(config, engines=3, servers=1, metrics=True, time_model=...,
    replay=True, limits=..., scoring=..., matching=..., **server flags)``: everything stopped when the
    test ends. ``replay=False``: engines without a replay endpoint."""
    assert (QWEN / "tokenizer.json").exists(), "run `make tokenizer` (make test does) first"
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            name: str,
            *,
            engines: int = 3,
            servers: int = 1,
            metrics: bool = True,
            time_model: TimeModel | None = None,
            replay: bool = True,
            limits: Limits | None = None,
            scoring: ScoringSettings | None = None,
            matching: str = "tokens",
            **server: Any,
        ) -> Fleet:
            ipc = stack.enter_context(tempfile.TemporaryDirectory(prefix="ic-e2e-"))
            running = []
            for i in range(engines):
                r = await fakeengine.start(
                    fakeengine.EngineConfig(
                        tokenizer=QWEN,
                        model=MODEL,
                        port=0,
                        block_size=BS,
                        num_gpu_blocks=512,
                        max_model_len=4096,
                        kv_events_endpoint=f"ipc://{ipc}/e{i}-events",
                        replay_endpoint=f"ipc://{ipc}/e{i}-replay" if replay else None,
                        time_model=time_model or TimeModel(),
                    )
                )
                stack.push_async_callback(r.close)
                running.append(r)
            cfg = server_config(
                running, metrics=metrics, limits=limits, scoring=scoring, matching=matching, **server
            )
            started = []
            for _ in range(servers):
                srv = Server(cfg)
                await srv.start()
                stack.push_async_callback(srv.stop, 0)
                started.append(srv)
            extproc = [s.addresses.extproc for s in started if s.addresses is not None]
            engine_addresses = [f"127.0.0.1:{r.port}" for r in running]
            shipped = envoy.load_config(CONFIGS[name])
            rewritten = envoy.loopback(shipped, extproc=extproc, engines=engine_addresses)
            proxy = await stack.enter_async_context(envoy.EnvoyProcess(rewritten))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            fleet = Fleet(running, started, proxy, session, stack, replay)
            await fleet.connect()
            return fleet

        yield start
