"""operator/handlers_controlplane.py: the three loops with the real ``Kube`` adapter against
kmock's Kubernetes emulator and, for the server side, a REAL in-process
``inference-cache serve`` (``extproc.serve.Server``, auth disabled, 127.0.0.1:0) reached
through ``ServerClient``.

The PromptTemplate test is issue #8's operator path end to end: a PromptTemplate in the
API -> status (templateRevision, Ready/Invalid) -> PUT /templates -> the server's
RenderTemplate RPC renders it and reports the same revision."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import kmock
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes import client as k8s

from inference_cache import config, render
from inference_cache.extproc import serve
from inference_cache.operator import handlers_controlplane as hc
from inference_cache.operator import kube
from inference_cache.operator.metrics import OperatorMetrics
from inference_cache.operator.server_client import ServerClient, ServerClientSettings, ServerUnavailable
from inference_cache.proto import pb, pb_grpc

from . import crd_validate

NOW = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
V = "inferencecache.io/v1alpha1"
POLICIES = kmock.resource("inferencecache.io", "v1alpha1", "cachepolicies")
TENANTS = kmock.resource("inferencecache.io", "v1alpha1", "cachetenants")
BACKENDS = kmock.resource("inferencecache.io", "v1alpha1", "cachebackends")
TEMPLATES = kmock.resource("inferencecache.io", "v1alpha1", "prompttemplates")
INDICES = kmock.resource("inferencecache.io", "v1alpha1", "cacheindices")
PODS = kmock.resource("", "v1", "pods")

TEXT_SPEC: dict[str, Any] = {
    "body": "You are {{.persona}}.\n\nQuestion: {{.question}}",
    "slots": [
        {"name": "persona", "type": "Stable", "required": True},
        {"name": "question", "type": "Mutable", "required": True},
    ],
    "allowedNamespaces": ["team-b"],
}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def declared(kmock: kmock.KubernetesEmulator) -> None:
    """The emulator answers 404 for undeclared resources (a CRD not installed)."""
    for plural in ("cachepolicies", "cachetenants", "cachebackends", "prompttemplates"):
        kmock.resources[f"inferencecache.io/v1alpha1/{plural}"] = kmock.ResourceInfo(namespaced=True)
    kmock.resources["inferencecache.io/v1alpha1/cacheindices"] = kmock.ResourceInfo(namespaced=False)
    kmock.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True)


@pytest.fixture
async def server() -> AsyncIterator[serve.Server]:
    settings = config.ServerSettings(
        grpc_bind_address="127.0.0.1:0",
        http_bind_address="127.0.0.1:0",
        snapshot_bind_address="127.0.0.1:0",
        extproc_bind_address="127.0.0.1:0",
        insecure_disable_auth=True,
    )
    srv = serve.Server(config.Config(server=settings, models=(config.ModelConfig("m"),)))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def make_plane(
    api: k8s.ApiClient, url: str, clock: Clock | None = None, metrics: OperatorMetrics | None = None
) -> hc.ControlPlane:
    client = ServerClient(ServerClientSettings(url=url, token_file=None))
    settings = hc.ControlPlaneSettings(observed_server=url)
    return hc.ControlPlane(
        kube.Kube(api, timeout_s=10),
        client,
        settings,
        clock=clock or Clock(),
        now=lambda: NOW,
        metrics=metrics or OperatorMetrics(),
    )


def ticks(metrics: OperatorMetrics, loop: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "inferencecache_operator_controlplane_ticks_total", {"loop": loop, "result": result}
    )
    return value or 0.0


@pytest.fixture
async def plane(api: k8s.ApiClient, server: serve.Server) -> AsyncIterator[hc.ControlPlane]:
    assert server.addresses is not None
    p = make_plane(api, f"http://{server.addresses.snapshot}")
    try:
        yield p
    finally:
        await p.stop()


def cr(
    kind: str, namespace: str | None, name: str, spec: dict[str, Any], generation: int = 1
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "generation": generation, "uid": f"uid-{name}"}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": V, "kind": kind, "metadata": meta, "spec": spec}


def plain(obj: Any) -> Any:
    """kmock's stored object as plain dicts and lists (what crd_validate takes)."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


# -- /policy ---------------------------------------------------------------------------------


async def test_policy_push_reaches_the_server_when_due(
    kmock: kmock.KubernetesEmulator, api: k8s.ApiClient, server: serve.Server
) -> None:
    assert server.addresses is not None
    clock = Clock()
    plane = make_plane(api, f"http://{server.addresses.snapshot}", clock)
    try:
        kmock.objects[POLICIES, "team-a", "p"] = cr("CachePolicy", "team-a", "p", {"evictionTTL": "90s"})
        kmock.objects[TENANTS, "team-a", "t"] = cr(
            "CacheTenant", "team-a", "t", {"tenantID": "acme", "quota": {"maxIndexEntries": 5}}
        )
        assert await plane.sync_policy()
        assert server.policies.ttl_s("team-a") == 90.0
        assert server.policies.quota("acme") == 5
        assert not await plane.sync_policy()  # unchanged, within the interval
        clock.t += 30  # the server may have restarted: re-push
        assert await plane.sync_policy()
        kmock.objects[POLICIES, "team-a", "p"] = cr("CachePolicy", "team-a", "p", {"evictionTTL": "5m"}, 2)
        assert await plane.sync_policy()
        assert server.policies.ttl_s("team-a") == 300.0
    finally:
        await plane.stop()


async def test_a_failed_push_is_not_recorded(api: k8s.ApiClient, unused_tcp_port: int) -> None:
    plane = make_plane(api, f"http://127.0.0.1:{unused_tcp_port}")
    try:
        with pytest.raises(ServerUnavailable):
            await plane.sync_policy()
        assert plane.last_policy is None  # retried on the next tick
    finally:
        await plane.stop()


# -- /snapshot ---------------------------------------------------------------------------------


async def test_snapshot_creates_the_cache_index_and_writes_tenant_statuses(
    kmock: kmock.KubernetesEmulator, plane: hc.ControlPlane, our_crds: dict[str, dict[str, Any]]
) -> None:
    kmock.objects[TENANTS, "team-a", "t"] = cr(
        "CacheTenant", "team-a", "t", {"tenantID": "acme", "quota": {"maxIndexEntries": 5}}
    )
    await plane.sync_snapshot()
    index = kmock.objects[INDICES, None, "cluster-default"]
    assert index["status"]["observedServer"] == plane.settings.observed_server
    assert index["status"]["prefixes"] == {"summary": {"total": 0, "hot": 0}}
    assert crd_validate.validate(plain(index), our_crds["CacheIndex"]) == []
    tenant = kmock.objects[TENANTS, "team-a", "t"]
    assert tenant["status"]["observedGeneration"] == 1
    assert {c["type"]: c["reason"] for c in tenant["status"]["conditions"]} == {
        "Ready": "Observed",
        "QuotaExceeded": "WithinBudget",
    }
    assert crd_validate.validate(plain(tenant), our_crds["CacheTenant"]) == []
    writes = len(kmock["patch"])
    await plane.sync_snapshot()  # nothing changed: no writes, no second CacheIndex
    assert len(kmock["patch"]) == writes
    assert len(kmock["post"]) == 1


@pytest.fixture
async def canned_snapshot() -> AsyncIterator[str]:
    body = {
        "replicas": [
            {
                "replicaId": "10.0.0.7:8000",
                "tenant": "team-a",
                "prefixCount": 12,
                "lastEventAt": "2026-03-04T05:06:00Z",
                "lastUpdate": "2026-03-04T05:06:01Z",
                "cacheMemoryBytes": 1024,
                "hitRate": 0.5,
                "pressure": 0.25,
            }
        ],
        "tenants": [{"tenantId": "acme", "indexEntries": 9, "memoryUsed": 10, "hitRate": 0.5}],
        "totalPrefixes": 12,
        "hotPrefixes": 1,
    }

    async def handle(_: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/snapshot", handle)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield str(srv.make_url("")).rstrip("/")
    finally:
        await srv.close()


async def test_snapshot_rows_reach_backend_participation_and_quota(
    kmock: kmock.KubernetesEmulator, api: k8s.ApiClient, canned_snapshot: str
) -> None:
    backend = cr("CacheBackend", "team-a", "b", {"engineSelector": {"matchLabels": {"app": "vllm"}}})
    kmock.objects[BACKENDS, "team-a", "b"] = backend
    kmock.objects[PODS, "team-a", "engine-0"] = {
        "metadata": {"name": "engine-0", "namespace": "team-a", "labels": {"app": "vllm"}},
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    }
    kmock.objects[TENANTS, "team-a", "t"] = cr(
        "CacheTenant", "team-a", "t", {"tenantID": "acme", "quota": {"maxIndexEntries": 5}}
    )
    plane = make_plane(api, canned_snapshot)
    try:
        await plane.sync_snapshot()
    finally:
        await plane.stop()
    assert kmock.objects[BACKENDS, "team-a", "b"]["status"]["indexParticipation"] == {
        "prefixCount": 12,
        "lastEventAt": "2026-03-04T05:06:00Z",
    }
    tenant = kmock.objects[TENANTS, "team-a", "t"]["status"]
    assert tenant["indexEntries"] == 9
    quota = next(c for c in tenant["conditions"] if c["type"] == "QuotaExceeded")
    assert (quota["status"], quota["reason"]) == ("True", "OverEntryBudget")
    index = kmock.objects[INDICES, None, "cluster-default"]["status"]
    assert [r["id"] for r in index["replicas"]] == ["10.0.0.7:8000"]
    assert kmock["list", PODS][0].url.path == "/api/v1/namespaces/team-a/pods"


# -- PromptTemplates: issue #8's operator path, end to end ----------------------------------------


async def _render(srv: serve.Server, **kw: Any) -> pb.RenderTemplateResponse:
    assert srv.addresses is not None
    async with grpc.aio.insecure_channel(srv.addresses.grpc) as ch:
        resp: pb.RenderTemplateResponse = await pb_grpc.InferenceCacheStub(ch).RenderTemplate(
            pb.RenderTemplateRequest(**kw)
        )
    return resp


VARIABLES = {"persona": "a librarian", "question": "Where is X?"}


async def test_prompt_templates_are_validated_pushed_and_rendered_by_the_server(
    kmock: kmock.KubernetesEmulator,
    plane: hc.ControlPlane,
    server: serve.Server,
    our_crds: dict[str, dict[str, Any]],
) -> None:
    kmock.objects[TEMPLATES, "team-a", "support"] = cr("PromptTemplate", "team-a", "support", TEXT_SPEC)
    kmock.objects[TEMPLATES, "team-a", "broken"] = cr(
        "PromptTemplate", "team-a", "broken", {"body": "Hi {{.x", "slots": [{"name": "x", "type": "Stable"}]}
    )
    assert await plane.sync_templates()

    good = kmock.objects[TEMPLATES, "team-a", "support"]["status"]
    revision = render.revision(render.TemplateSpec.from_dict(TEXT_SPEC))
    assert good["templateRevision"] == revision
    assert {c["type"]: (c["status"], c["reason"]) for c in good["conditions"]} == {
        "Ready": ("True", "TemplateValid"),
        "Invalid": ("False", "TemplateValid"),
    }
    bad = kmock.objects[TEMPLATES, "team-a", "broken"]["status"]
    assert "templateRevision" not in bad
    invalid = next(c for c in bad["conditions"] if c["type"] == "Invalid")
    assert (invalid["status"], invalid["reason"]) == ("True", "InvalidSpec")
    assert invalid["message"].startswith("spec.body (line 1, column ")
    for name in ("support", "broken"):
        assert (
            crd_validate.validate(plain(kmock.objects[TEMPLATES, "team-a", name]), our_crds["PromptTemplate"])
            == []
        )

    resp = await _render(server, template_ref="team-a/support", tenant_id="team-b", variables=VARIABLES)
    assert (resp.reason_code, resp.template_revision) == ("OK", revision)
    assert resp.rendered_prompt.decode() == "You are a librarian.\n\nQuestion: Where is X?"
    broken = await _render(server, template_ref="team-a/broken", tenant_id="team-a", variables={"x": "1"})
    assert broken.reason_code == "TEMPLATE_NOT_FOUND"

    # Nothing changed: no status writes, no push; then an edit is pushed (replace-on-write).
    writes = len(kmock["patch"])
    assert not await plane.sync_templates()
    assert len(kmock["patch"]) == writes
    edited = {**TEXT_SPEC, "body": "You are {{.persona}}!\n\nQ: {{.question}}"}
    kmock.objects[TEMPLATES, "team-a", "support"] = cr("PromptTemplate", "team-a", "support", edited, 2)
    assert await plane.sync_templates()
    new_revision = kmock.objects[TEMPLATES, "team-a", "support"]["status"]["templateRevision"]
    assert new_revision != revision
    resp = await _render(server, template_ref="team-a/support", tenant_id="team-a", variables=VARIABLES)
    assert (resp.reason_code, resp.template_revision) == ("OK", new_revision)

    # Deleted in the API: gone from the server on the next push.
    del kmock.objects[TEMPLATES, "team-a", "support"]
    assert await plane.sync_templates()
    gone = await _render(server, template_ref="team-a/support", tenant_id="team-a", variables=VARIABLES)
    assert gone.reason_code == "TEMPLATE_NOT_FOUND"


# -- running: loops and kopf registration ----------------------------------------------------------


async def _until(condition: Any, what: str) -> None:
    for _ in range(500):  # bounded wait on a real condition (I/O through threads and sockets)
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_loops_tick_at_start_and_on_wake_up(
    kmock: kmock.KubernetesEmulator, plane: hc.ControlPlane, server: serve.Server
) -> None:
    await plane.start()
    await _until(lambda: plane.last_policy is not None and plane.last_templates is not None, "first ticks")
    await _until(lambda: (INDICES, None, "cluster-default") in kmock.objects, "the CacheIndex")
    kmock.objects[TEMPLATES, "team-a", "support"] = cr("PromptTemplate", "team-a", "support", TEXT_SPEC)
    plane.templates_wake.set()
    await _until(
        lambda: server.templates.lookup("team-a/support", "team-a") is not None, "the pushed template"
    )
    kmock.objects[POLICIES, "team-a", "p"] = cr("CachePolicy", "team-a", "p", {"evictionTTL": "90s"})
    plane.policy_wake.set()
    await _until(lambda: server.policies.ttl_s("team-a") == 90.0, "the pushed policy")
    await plane.stop()
    assert plane._tasks == []
    # every loop's ticks counted, none failed (the templates loop ticked at least twice)
    loops = ("policy", "snapshot", "templates")
    assert all(ticks(plane.metrics, loop, "ok") >= 1 for loop in loops)
    assert ticks(plane.metrics, "templates", "ok") >= 2
    assert sum(ticks(plane.metrics, loop, "error") for loop in loops) == 0


async def test_a_failing_tick_is_logged_and_the_loop_goes_on(
    api: k8s.ApiClient, unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    plane = make_plane(api, f"http://127.0.0.1:{unused_tcp_port}")
    caplog.set_level(logging.WARNING, logger=hc.__name__)
    await plane.start()
    try:
        await _until(lambda: "control-plane policy tick failed" in caplog.text, "the logged failure")
        plane.policy_wake.set()
        await _until(lambda: caplog.text.count("control-plane policy tick failed") >= 2, "a second tick")
        assert all(not t.done() for t in plane._tasks)
        assert ticks(plane.metrics, "policy", "error") >= 2  # each failed tick counted
        assert ticks(plane.metrics, "policy", "ok") == 0
    finally:
        await plane.stop()


@pytest.mark.parametrize(
    ("event", "body", "wakes"),
    [
        ("ADDED", {"metadata": {"generation": 1}}, True),
        ("MODIFIED", {"metadata": {"generation": 2}, "status": {"observedGeneration": 1}}, True),
        ("MODIFIED", {"metadata": {"generation": 2}, "status": {"observedGeneration": 2}}, False),
        (None, {"metadata": {"generation": 2}, "status": {"observedGeneration": 2}}, False),
        ("DELETED", {"metadata": {"generation": 2}, "status": {"observedGeneration": 2}}, True),
    ],
)
async def test_registered_kopf_handlers_wake_the_loops_on_spec_changes(
    api: k8s.ApiClient, event: str | None, body: dict[str, Any], wakes: bool
) -> None:
    import kopf

    registry = kopf.OperatorRegistry()
    plane = make_plane(api, "http://127.0.0.1:1")
    hc.register(registry, plane)
    handlers = {h.id: h for h in registry._watching.get_all_handlers()}
    assert set(handlers) == {"wake-policy-cachepolicies", "wake-policy-cachetenants", "wake-templates"}
    assert {h.id for h in registry._activities.get_all_handlers()} == {
        "control-plane-start",
        "control-plane-stop",
    }
    await handlers["wake-policy-cachetenants"].fn(type=event, body=kopf.Body(body))
    await handlers["wake-templates"].fn(type=event, body=kopf.Body(body))
    assert plane.policy_wake.is_set() is wakes
    assert plane.templates_wake.is_set() is wakes
    await plane.stop()


def test_status_patch_sets_changed_keys_and_removes_none() -> None:
    assert hc.status_patch(None, {"a": 1, "b": None}) == {"a": 1}
    assert hc.status_patch({"a": 1, "b": 2}, {"a": 1, "b": None}) == {"b": None}
    assert hc.status_patch({"a": 1}, {"a": 1}) is None


def test_template_status_keeps_transition_times() -> None:
    body = cr("PromptTemplate", "team-a", "t", TEXT_SPEC)
    _, first = hc.template_status(body, NOW)
    later = NOW + dt.timedelta(hours=1)
    _, again = hc.template_status({**body, "status": first}, later)
    assert again == first
    broken = {**body, "spec": {"body": "{{.nope}}"}, "status": first}
    stored, status = hc.template_status(broken, later)
    assert stored is None
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["lastTransitionTime"]) == ("False", "2026-03-04T06:06:07Z")
