"""Endpoint discovery of ``serve`` (``inference_cache.extproc.discovery``, issue #7).

The reconcile is pure (running vs desired -> start/stop; the config file's endpoints win),
and so are the watch bookkeeping (events applied to the local copy, backoff), tested as
tables. The list + watch runs against kmock's API emulator: pod events made through the API
(create, patch NotReady, delete) reach ``apply`` without a re-list, a 410 Gone re-lists at
once, and while the API is down the last set stays. Then an in-process Server with
discovery pointed at kmock (the pods' IP is 127.0.0.1 and each backend's target port is a
fake engine we serve here) routes ``LookupRoute`` token ids to a discovered endpoint and
drops an endpoint when its pod is deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import kmock
import pytest
from aiohttp import web
from kubernetes import client as k8s

from inference_cache import config
from inference_cache.extproc import discovery, serve
from inference_cache.extproc.picking import Decision
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


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0)]
)
def test_backoff_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    assert discovery.backoff_s(failures) == delay


def _obj(name: str, version: str = "", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if version:
        meta["resourceVersion"] = version
    return {"metadata": meta, **extra}


@pytest.mark.parametrize(
    ("event", "after", "version"),
    [
        pytest.param({"type": "ADDED", "object": _obj("b", "5")}, ["a", "b"], "5", id="added"),
        pytest.param(
            {"type": "MODIFIED", "object": _obj("a", "6", spec={"x": 2})}, ["a"], "6", id="modified-replaces"
        ),
        pytest.param({"type": "DELETED", "object": _obj("a", "7")}, [], "7", id="deleted"),
        pytest.param({"type": "DELETED", "object": _obj("zz", "7")}, ["a"], "7", id="deleted-unknown"),
        pytest.param(
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}, ["a"], "9", id="bookmark"
        ),
        pytest.param({"type": "ADDED", "object": _obj("b")}, ["a", "b"], "", id="no-version"),
    ],
)
def test_apply_event(event: dict[str, Any], after: list[str], version: str) -> None:
    objects = {f"{NS}/a": _obj("a", "1", spec={"x": 1})}
    assert discovery.apply_event(objects, event) == version
    assert sorted(objects) == [f"{NS}/{n}" for n in after]
    if event["type"] == "MODIFIED":
        assert objects[f"{NS}/a"]["spec"] == {"x": 2}


def test_pods_are_kept_trimmed_to_what_discovery_reads() -> None:
    full = pod("p", "a")
    full["metadata"]["annotations"] = {"big": "x" * 1000}
    full["spec"] = {"containers": [{"name": "vllm"}]}
    objects: dict[str, Any] = {}
    discovery.apply_event(objects, {"type": "ADDED", "object": full}, discovery.trim_pod)
    kept = objects[f"{NS}/p"]
    assert "spec" not in kept and "annotations" not in kept["metadata"]
    assert kept["metadata"]["labels"] == {"engine": "a"}
    assert kept["status"] == full["status"]


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


def pod_at(name: str, ip: str, *, ready: bool = True) -> dict[str, Any]:
    p = pod(name, "a")
    p["status"] = {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}
    return p


class Applied:
    """``apply`` of :func:`discovery.watch`: records each applied set of addresses."""

    def __init__(self) -> None:
        self.sets: list[list[str]] = []
        self._changed = asyncio.Event()

    def __call__(self, found: Sequence[config.EndpointConfig]) -> None:
        self.sets.append(sorted(e.address for e in found))
        self._changed.set()

    async def until(self, addresses: list[str]) -> None:
        """Wait (bounded) until the last applied set is ``addresses``."""
        async with asyncio.timeout(10):
            while not self.sets or self.sets[-1] != addresses:
                self._changed.clear()
                await self._changed.wait()


WATCH_CFG = config.Config(
    models=(config.ModelConfig(MODEL),),
    # the safety-net re-list is out of the way: every re-list in these tests has a cause
    discovery=config.DiscoverySettings(enabled=True, interval_s=3600),
)


async def run_watch(
    k: kube.Kube, applied: Applied, sleep: Callable[[float], Any] = asyncio.sleep
) -> asyncio.Task[None]:
    return asyncio.create_task(discovery.watch(k, WATCH_CFG, applied, debounce_s=0, sleep=sleep))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watch_follows_pod_events_without_relisting(
    kmock: kmock.KubernetesEmulator, k: kube.Kube
) -> None:
    kmock.objects[BACKENDS, NS, "a"] = backend("a", 8000)
    kmock.objects[PODS, NS, "pa"] = pod_at("pa", "10.0.0.1")
    applied = Applied()
    task = await run_watch(k, applied)
    try:
        await applied.until(["10.0.0.1:8000"])
        # A new Ready pod is added.
        await asyncio.to_thread(k.create, pod_at("pb", "10.0.0.2"))
        await applied.until(["10.0.0.1:8000", "10.0.0.2:8000"])
        # A pod going NotReady is removed.
        not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        await asyncio.to_thread(k.patch, "v1", "Pod", NS, "pa", not_ready)
        await applied.until(["10.0.0.2:8000"])
        # A deleted pod is removed.
        await asyncio.to_thread(k.delete, "v1", "Pod", NS, "pb")
        await applied.until([])
        assert len(kmock["list", PODS]) == 1
        assert len(kmock["list", BACKENDS]) == 1
    finally:
        await stop(task)


async def test_a_410_gone_relists_at_once(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock.objects[BACKENDS, NS, "a"] = backend("a", 8000)
    kmock.objects[PODS, NS, "pa"] = pod_at("pa", "10.0.0.1")
    gone = [True]

    def expired() -> dict[str, Any]:
        gone.clear()
        return {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}

    kmock["watch", PODS, lambda: bool(gone)] << expired
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        await asyncio.sleep(0)

    applied = Applied()
    task = await run_watch(k, applied, sleep)
    try:
        await applied.until(["10.0.0.1:8000"])
        async with asyncio.timeout(10):  # the first list, then the one after the 410
            while len(kmock["list", PODS]) < 2:  # noqa: ASYNC110  # no event to await
                await asyncio.sleep(0.01)
        assert not gone
        assert [s for s in sleeps if s] == []  # no backoff: a 410 is not a failure
    finally:
        await stop(task)


async def test_api_down_keeps_the_last_set_and_backs_off(
    kmock: kmock.KubernetesEmulator, k: kube.Kube
) -> None:
    kmock.objects[BACKENDS, NS, "a"] = backend("a", 8000)
    kmock.objects[PODS, NS, "pa"] = pod_at("pa", "10.0.0.1")
    kmock.objects[PODS, NS, "pb"] = pod_at("pb", "10.0.0.2")
    down = [True]
    # The first list answers; then the pods API is down (watch and list) until ``down`` clears.
    (
        kmock["list", PODS, lambda: bool(down) and len(kmock["list", PODS]) > 1]
        << 503
        << {
            "kind": "Status",
            "message": "etcd",
        }
    )
    kmock["watch", PODS, lambda: bool(down)] << 503 << {"kind": "Status", "message": "etcd"}
    backoffs: asyncio.Queue[float] = asyncio.Queue()
    gate: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(s: float) -> None:
        if s:
            backoffs.put_nowait(s)
            await gate.get()  # the test decides when a backoff is over

    applied = Applied()
    task = await run_watch(k, applied, sleep)
    try:
        both = ["10.0.0.1:8000", "10.0.0.2:8000"]
        await applied.until(both)
        async with asyncio.timeout(10):  # the watch failed: backing off
            assert await backoffs.get() == 0.5
        del kmock.objects[PODS, NS, "pb"]
        gate.put_nowait(None)  # retry: the list fails too, the set stays
        async with asyncio.timeout(10):
            assert await backoffs.get() == 1.0
        assert applied.sets[-1] == both
        down.clear()
        gate.put_nowait(None)  # the API is back: pb is gone
        await applied.until(["10.0.0.1:8000"])
        assert all(s == both for s in applied.sets[:-1])
    finally:
        await stop(task)


async def test_server_routes_to_discovered_endpoints_and_drops_a_deleted_pod(
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
        discovery=config.DiscoverySettings(enabled=True, interval_s=3600),
    )
    kmock.objects[BACKENDS, NS, "a"] = backend("a", p1)
    kmock.objects[BACKENDS, NS, "b"] = backend("b", p2)
    kmock.objects[PODS, NS, "pa"] = pod("pa", "a")
    kmock.objects[PODS, NS, "pb"] = pod("pb", "b")
    srv = serve.Server(cfg, discovery_kube=k)

    async def workers_are(addresses: list[str]) -> None:
        async with asyncio.timeout(10):
            while sorted(w.replica_id for w in srv.workers) != sorted(addresses):  # noqa: ASYNC110  # no event to await
                await asyncio.sleep(0.01)

    await srv.start()
    try:
        tokens = list(range(100, 164))
        scope = types.Scope(NS, MODEL, "vllm")
        async with grpc.aio.insecure_channel(srv.addresses.grpc if srv.addresses else "") as ch:
            stub = pb_grpc.InferenceCacheStub(ch)

            async def routed() -> list[tuple[str, int]]:
                resp = await stub.LookupRoute(pb.LookupRouteRequest(model_id=MODEL, token_ids=tokens))
                return [(s.replica_id, s.matched_tokens) for s in resp.replica_scores]

            await workers_are([e1, e2])  # the watch's first list
            srv.index.blocks_stored(scope, e2, fingerprint.chain_keys(tokens, 16), [16, 32, 48, 64])
            assert await routed() == [(e2, 64)]
            for e in (e1, e2):  # one ext_proc decision each
                srv.metrics.extproc.decided(Decision(endpoints=(e,)), 0.001, MODEL, "precise")

            def series(name: str, e: str) -> float | None:
                return srv.metrics.registry.get_sample_value(name, {"replica_id": e})

            per_endpoint = ("inferencecache_endpoint_ready", "inferencecache_extproc_routed_total")
            assert all(series(name, e2) is not None for name in per_endpoint)

            # Pod b is deleted: the watch event drops its endpoint, worker and index entries,
            # and its per-endpoint series (a restarted pod comes back with a new address).
            await asyncio.to_thread(k.delete, "v1", "Pod", NS, "pb")
            await workers_are([e1])
            assert await routed() == [(e1, 0)]
            assert srv.index.total_entries == 0
            assert srv.picker.routes[MODEL].endpoints == (e1,)
            assert [series(name, e2) for name in per_endpoint] == [None, None]
            assert all(series(name, e1) is not None for name in per_endpoint)

            # A full poll on demand finds the same set.
            await srv.discover_once()
            assert [w.replica_id for w in srv.workers] == [e1]
    finally:
        await srv.stop()


def test_discovery_needs_a_kube_client() -> None:
    cfg = dataclasses.replace(config.Config(), discovery=config.DiscoverySettings(enabled=True))
    with pytest.raises(RuntimeError, match="Kube client"):
        serve.Server(cfg)
