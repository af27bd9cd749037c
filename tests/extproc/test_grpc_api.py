"""The InferenceCache gRPC API over real loopback sockets.

Each test starts a real ``Server`` (index, grpc.aio, aiohttp) on 127.0.0.1 ephemeral ports
(``start_server``/``server`` fixtures, stopped after the test) and talks to it with a
grpc.aio client. Index state is produced through the RPCs themselves or through the
index's KV-event sink (``blocks_stored``) as the subscriber would. The TokenReview API for
producer auth is a kmock HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import kmock
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference_cache import config, render
from inference_cache.extproc import auth, grpc_api, serve, templates
from inference_cache.index import fingerprint, types
from inference_cache.index.policy import NamespacePolicy
from inference_cache.proto import pb, pb_grpc

LOOPBACK = {
    "grpc_bind_address": "127.0.0.1:0",
    "http_bind_address": "127.0.0.1:0",
    "snapshot_bind_address": "127.0.0.1:0",
    "extproc_bind_address": "127.0.0.1:0",
    "insecure_disable_auth": True,
}
MODEL = "m"
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"


def make_config(*, endpoints: tuple[config.EndpointConfig, ...] = (), **server: Any) -> config.Config:
    settings = dataclasses.replace(config.ServerSettings(), **{**LOOPBACK, **server})
    return config.Config(
        server=settings, models=(config.ModelConfig(MODEL, block_size=16),), endpoints=endpoints
    )


StartServer = Callable[..., Any]


@pytest.fixture()
async def start_server() -> AsyncIterator[StartServer]:
    """``await start_server(config, **Server kwargs)`` -> a started ``Server`` (stopped after)."""
    started: list[serve.Server] = []

    async def start(cfg: config.Config | None = None, **kwargs: Any) -> serve.Server:
        srv = serve.Server(cfg or make_config(), **kwargs)
        await srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop()


@pytest.fixture()
async def server(start_server: StartServer) -> serve.Server:
    srv: serve.Server = await start_server(stream_metrics_interval_s=0)
    return srv


@pytest.fixture()
async def channel(server: serve.Server) -> AsyncIterator[grpc.aio.Channel]:
    assert server.addresses is not None
    async with grpc.aio.insecure_channel(server.addresses.grpc) as ch:
        yield ch


@pytest.fixture()
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceCacheStub:
    return pb_grpc.InferenceCacheStub(channel)


R1, R2, R3 = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
Type = pb.CacheEvent.Type


def _hashes(n: int, tag: str = "h") -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


async def _report(stub: pb_grpc.InferenceCacheStub, *updates: pb.CacheStateUpdate, **kw: Any) -> pb.Ack:
    async def gen() -> AsyncIterator[pb.CacheStateUpdate]:
        for u in updates:
            yield u

    ack: pb.Ack = await stub.ReportCacheState(gen(), **kw)
    return ack


def _chain(
    replica: str, hashes: list[bytes], *, tenant: str = "t", model: str = MODEL
) -> pb.CacheStateUpdate:
    return pb.CacheStateUpdate(
        replica_id=replica,
        model_id=model,
        tenant_id=tenant,
        hash_scheme="engine",
        prefixes=[pb.PrefixEntry(block_hashes=hashes, block_token_counts=[16] * len(hashes))],
    )


def _legacy(
    replica: str, prefix: bytes, tokens: int, *, tenant: str = "t", model: str = MODEL
) -> pb.CacheStateUpdate:
    return pb.CacheStateUpdate(
        replica_id=replica,
        model_id=model,
        tenant_id=tenant,
        hash_scheme="engine",
        prefixes=[pb.PrefixEntry(prefix_hash=prefix, token_count=tokens)],
    )


def _lookup(**kw: Any) -> pb.LookupRouteRequest:
    kw.setdefault("model_id", MODEL)
    kw.setdefault("tenant_id", "t")
    kw.setdefault("hash_scheme", "engine")
    return pb.LookupRouteRequest(**kw)


# -- LookupRoute -----------------------------------------------------------------------------


async def test_report_then_lookup_is_a_prefix_match(
    stub: pb_grpc.InferenceCacheStub, caplog: pytest.LogCaptureFixture
) -> None:
    ack = await _report(stub, _legacy(R1, b"p1", 128))
    assert ack == pb.Ack(accepted=True)
    caplog.set_level(logging.DEBUG)
    resp = await stub.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))
    assert resp.reason_code == "PREFIX_MATCH"
    assert [(s.replica_id, s.matched_tokens) for s in resp.replica_scores] == [(R1, 128)]
    assert resp.replica_scores[0].score == pytest.approx(128, rel=1e-3)
    assert resp.replica_scores[0].estimated_cache_hit_prob == pytest.approx(1, rel=1e-3)
    assert resp.lookup_latency_us >= 0
    assert not [r for r in caplog.records if r.name.startswith("inference_cache")], "LookupRoute must not log"
    miss = await stub.LookupRoute(_lookup(tenant_id="t2", prefix_hash=b"p1", prefix_token_count=128))
    assert (miss.reason_code, list(miss.replica_scores)) == ("UNKNOWN_TENANT", [])  # the miss classifier


async def test_chain_lookup_ranks_the_longest_leading_run_first(stub: pb_grpc.InferenceCacheStub) -> None:
    chain = _hashes(8)
    await _report(stub, _chain(R1, chain), _chain(R2, chain[:4]), _chain(R3, _hashes(2, "other")))
    resp = await stub.LookupRoute(_lookup(block_hashes=chain, block_token_counts=[16] * 8))
    assert resp.reason_code == "PREFIX_MATCH"
    assert [(s.replica_id, s.matched_tokens) for s in resp.replica_scores] == [(R1, 128), (R2, 64)]
    # matched x freshness x distinguishing power (3 replicas serve the scope: 2/3 and 1/3).
    assert [s.score for s in resp.replica_scores] == pytest.approx([128 * 2 / 3, 64 / 3], rel=1e-3)


@pytest.fixture()
async def healthy() -> AsyncIterator[Callable[[], Any]]:
    """``await healthy()`` -> the ``127.0.0.1:port`` of a server answering ``GET /health``
    200 (a ready engine endpoint for the server's probe)."""
    runners: list[web.AppRunner] = []

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start() -> str:
        app = web.Application()
        app.router.add_get("/health", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for r in runners:
        await r.cleanup()


async def _token_server(
    start_server: StartServer, healthy: Callable[[], Any], **model: Any
) -> tuple[serve.Server, str, str]:
    e1, e2 = await healthy(), await healthy()
    endpoints = tuple(
        config.EndpointConfig(address=e, model=MODEL, tenant="team-a", kv_events="tcp://127.0.0.1:9")
        for e in (e1, e2)
    )
    cfg = dataclasses.replace(
        make_config(endpoints=endpoints), models=(config.ModelConfig(MODEL, block_size=16, **model),)
    )
    srv = await start_server(cfg)
    return srv, e1, e2


async def test_token_ids_are_scored_like_the_picker(start_server: StartServer, healthy: Any) -> None:
    srv, e1, e2 = await _token_server(start_server, healthy)
    tokens = list(range(100, 164))
    keys = fingerprint.chain_keys(tokens, 16)
    srv.index.blocks_stored(types.Scope("team-a", MODEL, "vllm"), e2, keys, [16, 32, 48, 64])
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as ch:
        stub = pb_grpc.InferenceCacheStub(ch)

        async def lookup(**kw: Any) -> pb.LookupRouteResponse:
            kw.setdefault("token_ids", [*tokens, 1, 2, 3])
            resp: pb.LookupRouteResponse = await stub.LookupRoute(pb.LookupRouteRequest(model_id=MODEL, **kw))
            return resp

        def listed(resp: pb.LookupRouteResponse) -> list[tuple[str, int]]:
            return [(s.replica_id, s.matched_tokens) for s in resp.replica_scores]

        # The request's tenant is not the scope: the model's endpoints' tenant is. The
        # replica holding the prefix is chosen; a replica without a match is omitted.
        resp = await lookup(tenant_id="whoever")
        assert (resp.reason_code, listed(resp)) == ("PREFIX_MATCH", [(e2, 64)])
        assert 0 < resp.replica_scores[0].score < 1  # 1 / (1 + predicted TTFT ms)
        assert list(resp.token_ids) == []  # token ids are not echoed
        assert (await lookup(hash_scheme="vllm")).reason_code == "PREFIX_MATCH"
        # No match anywhere: the least loaded replica is still named (matched 0).
        other_adapter = await lookup(adapter_id="sql-lora")
        assert (other_adapter.reason_code, other_adapter.adapter_id) == ("LEAST_LOADED", "sql-lora")
        assert [m for _r, m in listed(other_adapter)] == [0]
        assert (await lookup(hash_scheme="sglang")).reason_code == "NO_HINT"
        assert (await lookup(token_ids=tokens[:15])).reason_code == "LEAST_LOADED"  # < one block
        # Below minimumMatchedTokens (64): the reason says so, the match is still reported.
        short = await lookup(token_ids=[*tokens[:32], *([7] * 16)])
        assert (short.reason_code, listed(short)) == ("LEAST_LOADED", [(e2, 32)])
        # Another replica also matching is listed after the chosen one, in TTFT order.
        srv.index.blocks_stored(types.Scope("team-a", MODEL, "vllm"), e1, keys[:1], [16])
        both = await lookup()
        assert listed(both) == [(e2, 64), (e1, 16)]
        assert both.replica_scores[0].score > both.replica_scores[1].score
        # An unready endpoint is never named.
        srv._on_ready_change(e2, False)
        assert listed(await lookup()) == [(e1, 16)]


async def test_prompt_text_is_tokenized_with_the_chat_template_and_echoed(
    start_server: StartServer, healthy: Any
) -> None:
    srv, e1, _e2 = await _token_server(start_server, healthy, tokenizer=str(TINY_TOKENIZER))
    text = "hello world, " * 40
    tokens = srv.picker.routes[MODEL].tokenizer.tokenizer.encode_chat([{"role": "user", "content": text}])
    keys = fingerprint.chain_keys(tokens, 16)
    srv.index.blocks_stored(
        types.Scope("team-a", MODEL, "vllm"), e1, keys, [16 * (i + 1) for i in range(len(keys))]
    )
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as ch:
        stub = pb_grpc.InferenceCacheStub(ch)
        resp = await stub.LookupRoute(pb.LookupRouteRequest(model_id=MODEL, prompt_text=text))
    assert list(resp.token_ids) == tokens
    assert resp.reason_code == "PREFIX_MATCH"
    assert [(s.replica_id, s.matched_tokens) for s in resp.replica_scores] == [(e1, len(keys) * 16)]


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(pb.LookupRouteRequest(model_id=MODEL, prompt_text="hello " * 64), id="prompt-text"),
        pytest.param(
            pb.LookupRouteRequest(model_id=MODEL, token_ids=[0] * ((1 << 20) + 1)), id="too-many-tokens"
        ),
        pytest.param(
            pb.LookupRouteRequest(model_id="unknown", token_ids=list(range(64))), id="unconfigured-model"
        ),
        pytest.param(
            _lookup(tenant_id="inferencecache.io/probe", prefix_hash=b"p1", prefix_token_count=128),
            id="probe",
        ),
        pytest.param(pb.LookupRouteRequest(), id="empty"),
    ],
)
async def test_no_hint_paths(stub: pb_grpc.InferenceCacheStub, request_: pb.LookupRouteRequest) -> None:
    await _report(stub, _legacy(R1, b"p1", 128))
    resp = await stub.LookupRoute(request_)
    assert (resp.reason_code, list(resp.replica_scores)) == ("NO_HINT", [])


async def test_timeout_when_the_answer_overruns_the_tenant_budget(start_server: StartServer) -> None:
    ticks = iter(range(1_000_000))
    srv = await start_server(monotonic=lambda: float(next(ticks)))  # every reading is 1 s later
    srv.policies.replace([NamespacePolicy(namespace="slow", lookup_timeout_ms=25)])
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as ch:
        stub = pb_grpc.InferenceCacheStub(ch)
        await _report(stub, _legacy(R1, b"p1", 128, tenant="slow"), _legacy(R1, b"p1", 128, tenant="t"))
        timed_out = await stub.LookupRoute(
            _lookup(tenant_id="slow", prefix_hash=b"p1", prefix_token_count=128)
        )
        assert (timed_out.reason_code, list(timed_out.replica_scores)) == ("TIMEOUT", [])
        no_budget = await stub.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))
        assert no_budget.reason_code == "PREFIX_MATCH"
        assert no_budget.lookup_latency_us == 1_000_000


async def test_timeout_when_the_caller_deadline_has_passed(server: serve.Server) -> None:
    svc = grpc_api.InferenceCacheService(
        index=server.index, policies=server.policies, config=server.config, metrics=server.metrics
    )
    server.index.blocks_stored(types.Scope("t", MODEL, "engine"), R1, [b"p1"], [128])
    req = _lookup(prefix_hash=b"p1", prefix_token_count=128)
    late = await svc.LookupRoute(req, _Context(remaining=0.0))  # type: ignore[arg-type]
    assert (late.reason_code, list(late.replica_scores), late.lookup_latency_us) == ("TIMEOUT", [], 0)
    in_time = await svc.LookupRoute(req, _Context(remaining=30.0))  # type: ignore[arg-type]
    assert in_time.reason_code == "PREFIX_MATCH"
    calls = server.metrics.registry.get_sample_value(
        "inferencecache_lookup_route_calls_total",
        {"model": MODEL, "reason_code": "TIMEOUT", "hint_used": "false"},
    )
    assert calls == 1


async def test_minimum_prefix_tokens_gate(server: serve.Server, stub: pb_grpc.InferenceCacheStub) -> None:
    server.policies.replace(
        [NamespacePolicy(namespace="t", minimum_prefix_tokens=256, affinity_routing=False)]
    )
    await _report(stub, _legacy(R1, b"p1", 128))
    resp = await stub.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))
    assert (resp.reason_code, list(resp.replica_scores)) == ("NO_HINT", [])
    resp = await stub.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=256))
    assert resp.reason_code == "PREFIX_MATCH"


# -- state reads and writes ---------------------------------------------------------------------


async def test_get_cache_state(stub: pb_grpc.InferenceCacheStub) -> None:
    stats = pb.ReplicaStats(replica_id="ignored", cache_memory_bytes=100, hit_rate=0.5, pressure=0.25)
    await _report(
        stub,
        pb.CacheStateUpdate(replica_id=R2, model_id=MODEL, tenant_id="t", stats=stats),
        pb.CacheStateUpdate(replica_id=R1, model_id=MODEL, tenant_id="t", stats=stats),
        _chain(R1, _hashes(3)),
        _chain(R2, _hashes(2)),
        _chain(R1, _hashes(5, "elsewhere"), tenant="t2"),
    )
    resp = await stub.GetCacheState(pb.GetCacheStateRequest(model_id=MODEL, tenant_id="t"))
    assert [r.replica_id for r in resp.replicas] == [R1, R2]
    assert resp.replicas[0] == pb.ReplicaStats(
        replica_id=R1, cache_memory_bytes=100, hit_rate=0.5, pressure=0.25
    )
    assert resp.summary == pb.CacheSummary(total_prefixes=3, hot_prefixes=0)


async def test_publish_event_evicts_and_clears(stub: pb_grpc.InferenceCacheStub) -> None:
    await _report(stub, _legacy(R1, b"p1", 128), _legacy(R1, b"p2", 128))
    ev = pb.CacheEvent(
        type=Type.PREFIX_EVICTED, replica_id=R1, model_id=MODEL, tenant_id="t", prefix_hash=b"p1"
    )
    assert await stub.PublishEvent(ev) == pb.Ack(accepted=True)
    evicted = await stub.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))
    assert evicted.reason_code == "AFFINITY_HINT"  # R1 still serves the scope (p2)
    assert (await stub.PublishEvent(pb.CacheEvent(type=Type.TYPE_UNSPECIFIED, replica_id=R1))).accepted
    kept = await stub.LookupRoute(_lookup(prefix_hash=b"p2", prefix_token_count=128))
    assert kept.reason_code == "PREFIX_MATCH"
    clear = pb.CacheEvent(type=Type.ALL_CLEARED, replica_id=R1, model_id=MODEL, tenant_id="t")
    assert (await stub.PublishEvent(clear)).accepted
    cleared = await stub.LookupRoute(_lookup(prefix_hash=b"p2", prefix_token_count=128))
    assert (cleared.reason_code, list(cleared.replica_scores)) == ("NO_HINT", [])


# -- streams ---------------------------------------------------------------------------------


async def test_stream_cache_events_filters_by_model_and_type(stub: pb_grpc.InferenceCacheStub) -> None:
    call = stub.StreamCacheEvents(pb.StreamEventsRequest(model_id=MODEL, types=[Type.PREFIX_EVICTED]))
    await call.initial_metadata()  # subscribed
    await _report(stub, _legacy(R1, b"p1", 128), _legacy(R1, b"p1", 128, model="other"))
    for model in ("other", MODEL):
        evict = pb.CacheEvent(
            type=Type.PREFIX_EVICTED, replica_id=R1, model_id=model, tenant_id="t", prefix_hash=b"p1"
        )
        await stub.PublishEvent(evict)
    event = await call.read()
    assert (event.type, event.replica_id, event.model_id, event.tenant_id, event.prefix_hash) == (
        Type.PREFIX_EVICTED,
        R1,
        MODEL,
        "t",
        b"p1",
    )
    assert event.timestamp_us > 0
    call.cancel()


async def test_stream_cache_events_filters_by_tenant(stub: pb_grpc.InferenceCacheStub) -> None:
    call = stub.StreamCacheEvents(pb.StreamEventsRequest(tenant_id="t2"))
    await call.initial_metadata()
    await _report(stub, _legacy(R1, b"p1", 128), _legacy(R2, b"p9", 64, tenant="t2"))
    event = await call.read()
    assert (event.type, event.replica_id, event.tenant_id, event.prefix_hash) == (
        Type.PREFIX_ADDED,
        R2,
        "t2",
        b"p9",
    )
    call.cancel()


class _Context:
    """The few ``ServicerContext`` calls the handlers make (``remaining``: the deadline)."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def test_slow_stream_consumers_drop_and_count(server: serve.Server) -> None:
    svc = grpc_api.InferenceCacheService(
        index=server.index,
        policies=server.policies,
        config=server.config,
        metrics=server.metrics,
        stream_queue_size=1,
    )
    stream = svc.StreamCacheEvents(pb.StreamEventsRequest(), _Context())  # type: ignore[arg-type]
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # one loop turn: the handler subscribes and waits on its queue
    scope = types.Scope("t", MODEL, "engine")
    for i in range(3):
        server.index.blocks_stored(scope, R1, [b"k%d" % i], [16])  # never blocks ingest
    assert (await asyncio.wait_for(first, 5)).prefix_hash == b"k0"
    assert server.metrics.registry.get_sample_value("inferencecache_stream_events_dropped_total") == 2
    await stream.aclose()  # unsubscribes: later events are not offered (nor counted)
    server.index.blocks_stored(scope, R1, [b"k9"], [16])
    assert server.metrics.registry.get_sample_value("inferencecache_stream_events_dropped_total") == 2


async def test_stream_metrics_sends_a_filtered_snapshot(stub: pb_grpc.InferenceCacheStub) -> None:
    metrics = [
        m async for m in stub.StreamMetrics(pb.StreamMetricsRequest(names=["inferencecache_server_up"]))
    ]
    assert [(m.name, m.type, m.value, dict(m.labels)) for m in metrics] == [
        ("inferencecache_server_up", "gauge", 1.0, {})
    ]
    assert metrics[0].timestamp_us > 0
    await stub.LookupRoute(_lookup())
    calls = [
        m
        async for m in stub.StreamMetrics(
            pb.StreamMetricsRequest(names=["inferencecache_lookup_route_calls_total"])
        )
    ]
    assert [(m.type, m.value, dict(m.labels)) for m in calls] == [
        ("counter", 1.0, {"model": MODEL, "reason_code": "NO_HINT", "hint_used": "false"})
    ]
    everything = [m async for m in stub.StreamMetrics(pb.StreamMetricsRequest())]
    assert {
        "inferencecache_server_grpc_tls_enabled",
        "inferencecache_lookup_route_latency_seconds_bucket",
    } <= {m.name for m in everything}
    assert not [m for m in everything if m.name.endswith("_created")]


async def test_stream_metrics_repeats_every_interval(server: serve.Server) -> None:
    svc = grpc_api.InferenceCacheService(
        index=server.index,
        policies=server.policies,
        config=server.config,
        metrics=server.metrics,
        metrics_interval_s=0.001,
        clock=iter(range(1, 100)).__next__,
    )
    stream = svc.StreamMetrics(pb.StreamMetricsRequest(names=["inferencecache_server_up"]), _Context())  # type: ignore[arg-type]
    assert [(await anext(stream)).timestamp_us for _ in range(2)] == [1_000_000, 2_000_000]
    await stream.aclose()


# -- stubs, health, reflection ------------------------------------------------------------------


async def test_fail_open_stubs(stub: pb_grpc.InferenceCacheStub) -> None:
    pd = await stub.LookupPDRoute(pb.LookupPDRouteRequest(model_id=MODEL, prefix_hash=b"p"))
    assert pd == pb.LookupPDRouteResponse(reason_code="NO_HINT")


async def test_health_is_serving_and_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [r async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(one())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert names == {
        "inferencecache.v1alpha1.InferenceCache",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


# -- the producer listener and producer auth ---------------------------------------------------


async def test_producer_port_serves_only_the_write_rpcs(start_server: StartServer) -> None:
    srv = await start_server(make_config(producer_bind_address="127.0.0.1:0"))
    assert srv.addresses.producer is not None and srv.addresses.producer != srv.addresses.grpc
    async with (
        grpc.aio.insecure_channel(srv.addresses.grpc) as main_ch,
        grpc.aio.insecure_channel(srv.addresses.producer) as prod_ch,
    ):
        main, producer = pb_grpc.InferenceCacheStub(main_ch), pb_grpc.InferenceCacheStub(prod_ch)
        for write in (
            lambda s: _report(s, _legacy(R1, b"p1", 128)),
            lambda s: s.PublishEvent(pb.CacheEvent(type=Type.ALL_CLEARED, replica_id=R2)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await write(main)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "--producer-bind-address" in (exc.value.details() or "")
            assert (await write(producer)).accepted
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await producer.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        resp = await main.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))
        assert resp.reason_code == "PREFIX_MATCH"


PRODUCER_SA = "system:serviceaccount:engines:subscriber"
OTHER_PRODUCER_SA = "system:serviceaccount:engines:other-subscriber"
#: token -> (username, audiences)
PRODUCER_TOKENS = {
    "producer-token": (OTHER_PRODUCER_SA, ("inferencecache.io/producer",)),
    "stranger-token": ("system:serviceaccount:default:stranger", ("inferencecache.io/producer",)),
    "wrong-audience-token": (PRODUCER_SA, ("inferencecache.io/controller",)),
}


def _review(request: kmock.Request) -> dict[str, Any]:
    spec = request.data["spec"]
    minted = PRODUCER_TOKENS.get(spec["token"])
    ok = minted is not None and bool(set(spec.get("audiences", [])) & set(minted[1]))
    status: dict[str, Any] = {"authenticated": ok}
    if ok and minted is not None:
        status["user"] = {"username": minted[0]}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


@pytest.fixture()
async def reviewer() -> AsyncIterator[auth.KubeTokenReviewer]:
    async with kmock.RawHandler() as handler, kmock.Server(handler) as apiserver:
        handler[f"post {auth.TOKENREVIEW_PATH}"] << _review
        async with auth.KubeTokenReviewer(auth.KubeAPIConfig(base_url=str(apiserver.url))) as r:
            yield r


async def test_producer_auth_admits_only_allowed_service_accounts(
    start_server: StartServer, reviewer: auth.KubeTokenReviewer
) -> None:
    cfg = make_config(allowed_producer_sa=(PRODUCER_SA, OTHER_PRODUCER_SA))
    srv = await start_server(cfg, reviewer=reviewer)
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as ch:
        stub = pb_grpc.InferenceCacheStub(ch)
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong-audience-token"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer stranger-token"),), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.PublishEvent(
                    pb.CacheEvent(type=Type.ALL_CLEARED, replica_id=R1), metadata=metadata
                )
            assert exc.value.code() == code, metadata
        ok = (("authorization", "Bearer producer-token"),)
        assert (await _report(stub, _legacy(R1, b"p1", 128), metadata=ok)).accepted
        resp = await stub.LookupRoute(_lookup(prefix_hash=b"p1", prefix_token_count=128))  # reads stay open
        assert resp.reason_code == "PREFIX_MATCH"
    results = {
        s.labels["result"]: s.value
        for f in srv.metrics.registry.collect()
        if f.name == "inferencecache_producer_auth"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert results == {"unauth": 3.0, "forbidden": 1.0, "ok": 1.0}


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture()
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl CLI)."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_grpc_serves_tls_from_the_flag_files(
    start_server: StartServer, keypair: tuple[Path, Path]
) -> None:
    cert, key = keypair
    srv = await start_server(make_config(tls_cert_file=str(cert), tls_key_file=str(key)))
    assert srv.metrics.registry.get_sample_value("inferencecache_server_grpc_tls_enabled") == 1
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(srv.addresses.grpc, creds) as ch:
        resp = await pb_grpc.InferenceCacheStub(ch).LookupPDRoute(pb.LookupPDRouteRequest())
    assert resp.reason_code == "NO_HINT"
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await pb_grpc.InferenceCacheStub(plain).LookupPDRoute(pb.LookupPDRouteRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    # The ext_proc port serves the same keypair, and the health service Envoy checks.
    extproc_health = health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor")
    async with grpc.aio.secure_channel(srv.addresses.extproc, creds) as ch:
        status = await health_pb2_grpc.HealthStub(ch).Check(extproc_health)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


# -- RenderTemplate ----------------------------------------------------------------------------

MANUAL = "Always answer politely. " * 12
TEXT_SPEC: dict[str, Any] = {
    "body": "You are {{.persona}}.\n\n{{.manual}}\n\nQuestion: {{.question}}",
    "slots": [
        {"name": "persona", "type": "Stable", "required": True},
        {"name": "manual", "type": "Stable", "required": True},
        {"name": "question", "type": "Mutable", "required": True},
    ],
    "normalization": "collapse",
    "allowedNamespaces": ["team-b"],
}
CHAT_SPEC: dict[str, Any] = {
    "messages": [
        {"role": "system", "body": "You are {{.persona}}.\n\n{{.manual}}"},
        {"role": "user", "body": "{{.question}}"},
    ],
    "slots": [
        {"name": "persona", "type": "Stable", "required": True},
        {"name": "manual", "type": "Stable", "required": True},
        {"name": "question", "type": "Mutable", "required": True},
    ],
}
VARIABLES = {"persona": " a  careful librarian ", "manual": MANUAL, "question": "Where is X?"}


async def _template_server(start_server: StartServer, *, tokenizer: bool = True) -> serve.Server:
    cfg = dataclasses.replace(
        make_config(endpoints=(config.EndpointConfig(address="127.0.0.1:1", model=MODEL, tenant="team-a"),)),
        models=(
            config.ModelConfig(MODEL, block_size=16, tokenizer=str(TINY_TOKENIZER) if tokenizer else None),
        ),
        templates=(
            config.TemplateConfig("team-a", "support", TEXT_SPEC),
            config.TemplateConfig("team-a", "chat", CHAT_SPEC),
        ),
    )
    srv: serve.Server = await start_server(cfg)
    return srv


async def _render(srv: serve.Server, **kw: Any) -> pb.RenderTemplateResponse:
    kw.setdefault("variables", VARIABLES)
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as ch:
        resp: pb.RenderTemplateResponse = await pb_grpc.InferenceCacheStub(ch).RenderTemplate(
            pb.RenderTemplateRequest(**kw)
        )
    return resp


async def test_render_template_text_returns_the_prompt_and_its_stable_keys(start_server: StartServer) -> None:
    srv = await _template_server(start_server)
    spec = render.TemplateSpec.from_dict(TEXT_SPEC)
    resp = await _render(srv, template_ref="team-a/support", tenant_id="team-a", model_id=MODEL)
    text = render.render(spec, VARIABLES).text
    assert text is not None
    assert (resp.reason_code, resp.rendered_prompt.decode()) == ("OK", text)
    assert resp.template_revision == render.revision(spec)
    assert resp.tenant_namespace == b""
    # The stable keys are the leading keys of the full prompt's own keys, and end before
    # the question.
    tok = srv.picker.routes[MODEL].tokenizer
    assert tok is not None
    ids = tok.tokenizer.encode(text)
    keys = list(resp.stable_block_hashes)
    assert len(keys) >= 3
    assert keys == fingerprint.chain_keys(ids, 16)[: len(keys)]
    assert resp.stable_token_count < len(ids)
    assert resp.stable_prefix_hash == keys[-1]
    assert len(keys) * 16 <= resp.stable_token_count < len(keys) * 16 + 16
    # Another question, same stable values (after normalisation): the same keys, from the cache.
    again = await _render(
        srv,
        template_ref="team-a/support",
        tenant_id="team-a",
        model_id=MODEL,
        variables={**VARIABLES, "persona": "a careful librarian", "question": "Why?"},
    )
    assert list(again.stable_block_hashes) == keys
    assert srv.templates.cached == 1


async def test_render_template_chat_returns_the_messages_as_json(start_server: StartServer) -> None:
    srv = await _template_server(start_server)
    resp = await _render(srv, template_ref="team-a/chat", model_id=MODEL)  # tenant: the model's
    messages = json.loads(resp.rendered_prompt)
    assert resp.reason_code == "OK"
    assert messages == [
        {"role": "system", "content": f"You are  a  careful librarian .\n\n{MANUAL}"},
        {"role": "user", "content": "Where is X?"},
    ]
    tok = srv.picker.routes[MODEL].tokenizer
    assert tok is not None
    full = fingerprint.chain_keys(tok.tokenizer.encode_chat(messages), 16)
    keys = list(resp.stable_block_hashes)
    assert len(keys) >= 3 and keys == full[: len(keys)]


@pytest.mark.parametrize(
    ("kw", "reason", "revision"),
    [
        pytest.param(
            {"template_ref": "team-a/nope", "tenant_id": "team-a"}, "TEMPLATE_NOT_FOUND", False, id="unknown"
        ),
        pytest.param(
            {"template_ref": "team-a/support", "tenant_id": "team-c"},
            "TEMPLATE_NOT_FOUND",
            False,
            id="other-ns",
        ),
        pytest.param(
            {"template_ref": "team-a/chat", "tenant_id": "team-b"},
            "TEMPLATE_NOT_FOUND",
            False,
            id="not-allowed",
        ),
        pytest.param({"template_ref": "team-a/support"}, "TEMPLATE_NOT_FOUND", False, id="no-namespace"),
        pytest.param({"template_ref": "team-a/support", "tenant_id": "team-b"}, "OK", True, id="allowed-ns"),
        pytest.param({"template_ref": "support", "tenant_id": "team-a"}, "OK", True, id="bare-name"),
        pytest.param(
            {"template_ref": "team-a/support", "tenant_id": "team-a", "variables": {"persona": "x"}},
            "RENDER_ERROR",
            True,
            id="missing-required",
        ),
        pytest.param(
            {"template_ref": "team-a/support", "tenant_id": "team-a", "variables": {**VARIABLES, "x": "1"}},
            "RENDER_ERROR",
            True,
            id="unknown-variable",
        ),
    ],
)
async def test_render_template_reason_codes(
    start_server: StartServer, kw: dict[str, Any], reason: str, revision: bool
) -> None:
    srv = await _template_server(start_server)
    resp = await _render(srv, **kw)
    assert resp.reason_code == reason
    assert resp.template_revision == (
        render.revision(render.TemplateSpec.from_dict(TEXT_SPEC)) if revision else ""
    )
    assert bool(resp.rendered_prompt) == (reason == "OK")
    assert list(resp.stable_block_hashes) == [] and resp.stable_prefix_hash == b""  # no model_id


@pytest.mark.parametrize("tokenizer", [True, False], ids=["unknown-model", "no-tokenizer"])
async def test_render_template_without_a_tokenizer_renders_without_keys(
    start_server: StartServer, tokenizer: bool
) -> None:
    srv = await _template_server(start_server, tokenizer=tokenizer)
    model = "other" if tokenizer else MODEL
    resp = await _render(srv, template_ref="team-a/support", tenant_id="team-a", model_id=model)
    assert (resp.reason_code, resp.stable_token_count, resp.stable_prefix_hash) == ("OK", 0, b"")
    assert resp.rendered_prompt.startswith(b"You are a careful librarian.")
    assert list(resp.stable_block_hashes) == []


async def test_render_template_after_put_templates(start_server: StartServer) -> None:
    srv = await _template_server(start_server)
    spec = {**TEXT_SPEC, "allowedNamespaces": []}
    stored = templates.build("team-z", "only", spec)
    async with aiohttp.ClientSession() as session:
        url = f"http://{srv.addresses.snapshot}/templates"
        async with session.put(url, data=templates.encode([stored])) as r:
            assert r.status == 204
    assert (await _render(srv, template_ref="team-a/support", tenant_id="team-a")).reason_code == (
        "TEMPLATE_NOT_FOUND"
    )
    resp = await _render(srv, template_ref="team-z/only", tenant_id="team-z")
    assert (resp.reason_code, resp.template_revision) == ("OK", stored.revision)
