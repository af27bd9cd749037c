"""One ext_proc round trip per request, against a real Envoy 1.40.

Real: the Envoy binary, the shipped ``examples/envoy/envoy-streamed.yaml`` (and variants of
the shipped configs built here), our :class:`~inference_cache.extproc.protocol.ExtProcService`
over gRPC, echo engines. A stand-in: the picker behind the service (:class:`Recorder`, which
records each :class:`~inference_cache.extproc.picking.PickRequest` and chooses ``choose``).

What is pinned:

* ``envoy-streamed.yaml`` routes with one round trip: Envoy sends the body without waiting
  for our headers answer (were it waiting, the request would hang until ``message_timeout``),
  two messages each way for a small body, no response headers; the tenant header and the
  proxy's subset hint still reach the picker; a megabyte body passes; it fails closed.
* The same settings keep ``envoy-override-host.yaml`` fail-open with the server down.
* Why not one BUFFERED message (``request_header_mode: SKIP``): Envoy's router picks the
  upstream at the request headers, so a destination set in the body answer is never used.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inference_cache import envoy
from inference_cache.extproc import picking, protocol

from .conftest import CONFIGS, DESTINATION, EXTPROC_FILTER, EchoEngine, answer
from .test_routing import refusing_port

STREAMED = CONFIGS["buffered"].parent / "envoy-streamed.yaml"
TENANT_HEADER = "x-inference-cache-tenant"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()


@dataclasses.dataclass
class Recorder:
    """A picker choosing ``choose`` for every request; records what it was asked."""

    choose: str = ""
    requests: list[picking.PickRequest] = dataclasses.field(default_factory=list)
    outcomes: list[picking.Outcome] = dataclasses.field(default_factory=list)

    async def pick(self, request: picking.PickRequest) -> picking.Decision:
        self.requests.append(request)
        return picking.Decision(endpoints=(self.choose,))

    def finished(self, decision: picking.Decision, outcome: picking.Outcome) -> None:
        self.outcomes.append(outcome)


@dataclasses.dataclass
class Observed:
    requests: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    def request(self, *, mode: str, outcome: str, status: int) -> None:
        self.requests.append((mode, outcome, status))

    def usage(self, predicted: picking.Decision, usage: picking.Usage) -> None:
        raise AssertionError("no response messages expected")


@dataclasses.dataclass
class Served:
    recorder: Recorder
    observed: Observed
    address: str


@pytest.fixture
async def service(engines: list[EchoEngine]) -> AsyncIterator[Served]:
    """Our ext_proc service (default settings) on 127.0.0.1, choosing engine #2, with gRPC health."""
    recorder, observed = Recorder(choose=engines[1].address), Observed()
    server = grpc.aio.server()
    protocol.add_to_server(protocol.ExtProcService(recorder, protocol.ProtocolSettings(), observed), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(protocol.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(recorder, observed, f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


def _ext_proc(config: dict[str, Any]) -> dict[str, Any]:
    (f,) = [f for f in _http_filters(config) if f["name"] == EXTPROC_FILTER]
    typed: dict[str, Any] = f["typed_config"]
    return typed


def with_subset_hint(config: dict[str, Any], subset: list[str]) -> dict[str, Any]:
    """``config`` with a ``set_metadata`` filter before ext_proc putting ``subset`` in
    ``envoy.lb.subset_hint`` (what a gateway in front of the picker does)."""
    out = copy.deepcopy(config)
    hint = {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [
                {"metadata_namespace": picking.SUBSET_NAMESPACE, "value": {picking.SUBSET_KEY: subset}}
            ],
        },
    }
    filters = _http_filters(out)
    filters.insert([f["name"] for f in filters].index(EXTPROC_FILTER), hint)
    return out


def streamed_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with envoy-streamed.yaml's ext_proc settings."""
    out = copy.deepcopy(config)
    target, source = _ext_proc(out), _ext_proc(envoy.load_config(STREAMED))
    for key in ("processing_mode", "send_body_without_waiting_for_header_response"):
        target[key] = source[key]
    for key in ("allow_mode_override", "allowed_override_modes", "response_attributes"):
        target.pop(key, None)
    return out


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = io.BytesIO(body) if len(body) > 1 << 20 else body  # large: chunked, without a warning
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


async def settled(recorder: Recorder, count: int, timeout_s: float = 10.0) -> None:
    """Until ``count`` outcomes were reported (streams close after the response; bounded)."""
    deadline = time.monotonic() + timeout_s
    while len(recorder.outcomes) < count:
        assert time.monotonic() < deadline, f"{len(recorder.outcomes)} of {count} streams settled"
        await asyncio.sleep(0.01)


def ext_proc_stat(stats: dict[str, int | str], name: str) -> int:
    return int(stats.get(f"http.llm.ext_proc.{name}", 0))


async def test_streamed_config_routes_in_one_round_trip(engines: list[EchoEngine], service: Served) -> None:
    subset = [engines[0].address, engines[1].address]
    config = with_subset_hint(envoy.loopback(envoy.load_config(STREAMED), extproc=service.address), subset)
    async with envoy.EnvoyProcess(config) as proxy:
        for i in range(3):
            status, body = await post(proxy.url, CHAT, headers={TENANT_HEADER: f"t{i}"})
            assert status == 200, body
            assert answer(body) == {
                "engine": "engine-2",
                "body_bytes": len(CHAT),
                "destination": engines[1].address,
            }
        stats = await proxy.stats()
    # Out: the headers, then the body chunks (HTTP/1: the data, then an empty end_of_stream
    # chunk) at once; back: one answer each, all after the last chunk. No response messages.
    assert ext_proc_stat(stats, "stream_msgs_sent") == ext_proc_stat(stats, "stream_msgs_received") == 3 * 3
    await settled(service.recorder, 3)  # each stream closed without a response message
    assert [(o.response_complete, o.status) for o in service.recorder.outcomes] == [(False, None)] * 3
    assert [(r.path, r.body, r.headers[TENANT_HEADER], r.subset) for r in service.recorder.requests] == [
        ("/v1/chat/completions", CHAT, f"t{i}", tuple(subset)) for i in range(3)
    ]
    assert service.observed.requests == [("streamed", "routed", 0)] * 3
    assert engines[0].requests == 0


async def test_streamed_config_passes_a_megabyte_body(engines: list[EchoEngine], service: Served) -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    async with envoy.EnvoyProcess(
        envoy.loopback(envoy.load_config(STREAMED), extproc=service.address)
    ) as proxy:
        status, body = await post(proxy.url, big)
        stats = await proxy.stats()
    assert status == 200, body
    assert answer(body) == {"engine": "engine-2", "body_bytes": len(big), "destination": engines[1].address}
    assert [r.body for r in service.recorder.requests] == [big]
    # Many chunks, one answer each, all after the body: still one round trip.
    chunks = ext_proc_stat(stats, "stream_msgs_sent") - 1
    assert chunks > 1
    assert ext_proc_stat(stats, "stream_msgs_received") == 1 + chunks


async def test_streamed_settings_keep_override_host_fail_open(engines: list[EchoEngine]) -> None:
    config = streamed_settings(envoy.load_config(CONFIGS["override-host"]))
    with refusing_port() as nobody:
        rewritten = envoy.loopback(config, extproc=nobody, engines=[e.address for e in engines])
        async with envoy.EnvoyProcess(rewritten) as proxy:
            served = []
            for _ in range(4):
                status, body = await post(proxy.url, CHAT, headers={DESTINATION: engines[0].address})
                assert status == 200, body
                assert answer(body)["destination"] is None  # the client's copy was dropped
                served.append(answer(body)["engine"])
            stats = await proxy.stats()
    assert sorted(served) == ["engine-1", "engine-1", "engine-2", "engine-2"]  # round robin
    assert ext_proc_stat(stats, "failure_mode_allowed") == 4


async def test_streamed_config_fails_closed() -> None:
    with refusing_port() as nobody:
        async with envoy.EnvoyProcess(envoy.loopback(envoy.load_config(STREAMED), extproc=nobody)) as proxy:
            status, _ = await post(proxy.url, CHAT)
    assert status == 500


def skip_request_headers(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with BUFFERED ext_proc sending only the body (headers as attributes)."""
    out = copy.deepcopy(config)
    ext_proc = _ext_proc(out)
    ext_proc["processing_mode"]["request_header_mode"] = "SKIP"
    ext_proc["processing_mode"]["response_header_mode"] = "SKIP"
    ext_proc["request_attributes"] = ["request.path", "request.method", f"request.headers['{TENANT_HEADER}']"]
    for key in ("allow_mode_override", "allowed_override_modes"):
        ext_proc.pop(key)
    return out


async def test_one_buffered_message_cannot_route(engines: list[EchoEngine], service: Served) -> None:
    """With the request headers skipped the filter lets them through, so the router picks an
    upstream before the body (and our answer to it) exists."""
    original_dst = skip_request_headers(envoy.load_config(CONFIGS["buffered"]))
    async with envoy.EnvoyProcess(envoy.loopback(original_dst, extproc=service.address)) as proxy:
        status, _ = await post(proxy.url, CHAT)
        stats = await proxy.stats()
    assert status == 503  # no destination yet: "no healthy upstream", ext_proc never asked
    assert ext_proc_stat(stats, "stream_msgs_sent") == 0
    members = [e.address for e in engines]
    override_host = skip_request_headers(envoy.load_config(CONFIGS["override-host"]))
    async with envoy.EnvoyProcess(
        envoy.loopback(override_host, extproc=service.address, engines=members)
    ) as proxy:
        for _ in range(2):
            status, body = await post(proxy.url, CHAT, headers={TENANT_HEADER: "t"})
            assert status == 200, body
            assert answer(body)["destination"] is None  # our body answer's header came too late
        stats = await proxy.stats()
    # One body message per request, answered (unchanged: a body without headers is not
    # routed), and round robin, not the picker, chose.
    assert ext_proc_stat(stats, "stream_msgs_sent") == ext_proc_stat(stats, "stream_msgs_received") == 2
    assert service.recorder.requests == []
    assert engines[0].requests == engines[1].requests == 1
