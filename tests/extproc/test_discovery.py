"""Endpoint discovery of ``serve`` (``inference_cache.extproc.discovery``, issue #7).

The reconcile is pure (running vs desired -> start/stop; the config file's endpoints win),
tested as tables. Then an in-process Server with discovery pointed at kmock (scripted
CacheBackends and pods; the pods' IP is 127.0.0.1 and each backend's target port is a fake
engine we serve here) routes ``LookupRoute`` token ids to a discovered endpoint, keeps the
last known set while the API fails, and drops an endpoint when its pod disappears.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import kmock
import pytest
from aiohttp import web
from kubernetes import client as k8s

from inference_cache import config
from inference_cache.extproc import discovery, serve
from inference_cache.index import fingerprint, types
from inference_cache.operator import kube
from inference_cache.proto import pb, pb_grpc

MODEL = "qwen"
NS = "team-a"
BACKENDS = kmock.resource("inferencecache.io", "v1alpha1", "cachebackends")
PODS = kmock.resource("", "v1", "pods")


def ep(address: str, **kw: Any) -> config.EndpointConfig:
    return config.EndpointConfig(address=address, model=MODEL, **kw)


# -- the pure reconcile ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("running", "wanted", "start", "stop"),
    [
        pytest.param([], [], [], [], id="nothing"),
        pytest.param([], [ep("10.0.0.1:8000")], [ep("10.0.0.1:8000")], [], id="new"),
        pytest.param([ep("10.0.0.1:8000")], [], [], ["10.0.0.1:8000"], id="gone"),
        pytest.param([ep("10.0.0.1:8000")], [ep("10.0.0.1:8000")], [], [], id="same"),
        pytest.param(
            [ep("10.0.0.1:8000", kv_events="tcp://10.0.0.1:5557")],
            [ep("10.0.0.1:8000", kv_events="tcp://10.0.0.1:5558")],
            [ep("10.0.0.1:8000", kv_events="tcp://10.0.0.1:5558")],
            ["10.0.0.1:8000"],
            id="changed-restarts",
        ),
        pytest.param(
            [ep("10.0.0.1:8000"), ep("10.0.0.2:8000")],
            [ep("10.0.0.2:8000"), ep("10.0.0.3:8000")],
            [ep("10.0.0.3:8000")],
            ["10.0.0.1:8000"],
            id="mixed",
        ),
    ],
)
def test_plan(
    running: list[config.EndpointConfig],
    wanted: list[config.EndpointConfig],
    start: list[config.EndpointConfig],
    stop: list[str],
) -> None:
    change = discovery.plan({e.address: e for e in running}, wanted)
    assert (list(change.start), list(change.stop)) == (start, stop)
    assert change.empty == (not start and not stop)


def test_the_config_files_endpoints_win_over_discovered_ones() -> None:
    static = [ep("10.0.0.1:8000", tenant="file")]
    found = [ep("10.0.0.1:8000", tenant="found"), ep("10.0.0.2:8000")]
    assert discovery.desired(static, found) == (static[0], found[1])


# -- against kmock -----------------------------------------------------------------------------


def backend(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": "None",
            "engineSelector": {"matchLabels": {"engine": name}},
            "gateway": {"modelName": MODEL, "targetPorts": [port]},
        },
    }


def pod(name: str, engine: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"engine": engine}},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.fixture
async def engine_ports() -> AsyncIterator[tuple[int, int]]:
    """Two fake engines (``GET /health`` 200) on 127.0.0.1: the pods' target ports."""

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(2):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(runner.addresses[-1][1])
    try:
        yield ports[0], ports[1]
    finally:
        await runner.cleanup()


@pytest.fixture
def k(kmock: kmock.KubernetesEmulator) -> Iterator[kube.Kube]:
    conf = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    conf.retries = 0
    with k8s.ApiClient(conf) as api:
        yield kube.Kube(api, timeout_s=10)


async def test_discover_lists_backends_and_pods_and_skips_an_invalid_backend(
    kmock: kmock.KubernetesEmulator, k: kube.Kube
) -> None:
    kmock.objects[BACKENDS, NS, "a"] = backend("a", 8000)
    kmock.objects[BACKENDS, NS, "b"] = backend("b", 8000)  # same pod IP and port as "a"
    unknown = backend("c", 8001)
    unknown["spec"]["gateway"]["modelName"] = "not-configured"
    kmock.objects[BACKENDS, NS, "c"] = unknown
    kmock.objects[PODS, NS, "pa"] = pod("pa", "a")
    kmock.objects[PODS, NS, "pb"] = pod("pb", "b")
    kmock.objects[PODS, NS, "pc"] = pod("pc", "c")
    cfg = config.Config(models=(config.ModelConfig(MODEL),))
    found = await asyncio.to_thread(discovery.discover, k, cfg)  # the mock serves on this loop
    assert [(e.address, e.tenant, e.kv_events) for e in found] == [
        ("127.0.0.1:8000", NS, "tcp://127.0.0.1:5557")
    ]


async def test_server_routes_to_discovered_endpoints_and_drops_a_gone_pod(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, engine_ports: tuple[int, int]
) -> None:
    p1, p2 = engine_ports
    e1, e2 = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
    cfg = config.Config(
        server=config.ServerSettings(
            grpc_bind_address="127.0.0.1:0",
            http_bind_address="127.0.0.1:0",
            snapshot_bind_address="127.0.0.1:0",
            extproc_bind_address="127.0.0.1:0",
            insecure_disable_auth=True,
        ),
        models=(config.ModelConfig(MODEL, block_size=16),),
        # the ticker's own polls are out of the way: the test polls with discover_once()
        discovery=config.DiscoverySettings(enabled=True, interval_s=3600),
    )
    kmock.objects[BACKENDS, NS, "a"] = backend("a", p1)
    kmock.objects[BACKENDS, NS, "b"] = backend("b", p2)
    kmock.objects[PODS, NS, "pa"] = pod("pa", "a")
    kmock.objects[PODS, NS, "pb"] = pod("pb", "b")
    srv = serve.Server(cfg, discovery_kube=k)
    await srv.start()
    try:
        tokens = list(range(100, 164))
        scope = types.Scope(NS, MODEL, "vllm")
        async with grpc.aio.insecure_channel(srv.addresses.grpc if srv.addresses else "") as ch:
            stub = pb_grpc.InferenceCacheStub(ch)

            async def routed() -> list[tuple[str, int]]:
                resp = await stub.LookupRoute(pb.LookupRouteRequest(model_id=MODEL, token_ids=tokens))
                return [(s.replica_id, s.matched_tokens) for s in resp.replica_scores]

            await srv.discover_once()
            assert sorted(w.replica_id for w in srv.workers) == sorted([e1, e2])
            srv.index.blocks_stored(scope, e2, fingerprint.chain_keys(tokens, 16), [16, 32, 48, 64])
            assert await routed() == [(e2, 64)]

            # The API fails: the last known set stays, even with pod b gone meanwhile.
            api_down = [True]
            kmock["list", PODS, lambda: bool(api_down)] << 503 << {"kind": "Status", "message": "etcd"}
            del kmock.objects[PODS, NS, "pb"]
            await srv.discover_once()
            assert sorted(w.replica_id for w in srv.workers) == sorted([e1, e2])
            assert await routed() == [(e2, 64)]

            # The API is back: b's endpoint, worker and index entries go; routing names e1.
            api_down.clear()
            await srv.discover_once()
            assert [w.replica_id for w in srv.workers] == [e1]
            assert await routed() == [(e1, 0)]
            assert srv.index.total_entries == 0
            assert srv.picker.routes[MODEL].endpoints == (e1,)
    finally:
        await srv.stop()


def test_discovery_needs_a_kube_client() -> None:
    cfg = dataclasses.replace(config.Config(), discovery=config.DiscoverySettings(enabled=True))
    with pytest.raises(RuntimeError, match="Kube client"):
        serve.Server(cfg)
