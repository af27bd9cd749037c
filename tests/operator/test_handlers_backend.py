"""operator/handlers_backend.py against a scripted kmock API: for the sample CacheBackends
the handler applies exactly what the pure functions plan, patches the planned status (with
status.gateway), posts the planned Events, reports a missing CRD in status.gateway.skipped,
stops at a failed Deployment apply, prunes gateway objects it no longer emits, and turns a
failed read into a kopf retry. The expected values come from ``backend.desired_backend`` and
``gateway.desired_gateway_objects`` called on the same inputs."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import Iterator
from typing import Any

import kmock
import kopf
import pytest
from kubernetes import client as k8s

from inference_cache.operator import backend, gateway, handlers_backend, kube

from . import crd_validate

NOW = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
NS = "llm"
UID = "0b8f4f5e-uid"

BACKENDS = kmock.resource("inferencecache.io", "v1alpha1", "cachebackends")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
POOLS = kmock.resource("inference.networking.k8s.io", "v1", "inferencepools")

SETTINGS = handlers_backend.BackendHandlerSettings(
    gateway=gateway.GatewaySettings(service_name="inference-cache-server", service_namespace=NS)
)

ENGINE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "vllm-0", "namespace": NS, "labels": {"app": "vllm"}},
    "status": {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
}

pytestmark = pytest.mark.kmock(cls=kmock.KubernetesScaffold)


def as_live(sample: dict[str, Any]) -> dict[str, Any]:
    cr = copy.deepcopy(sample)
    cr["metadata"] |= {"namespace": NS, "uid": UID, "generation": 3}
    return cr


def status_body(code: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "code": code, "message": f"scripted {code}"}


@pytest.fixture
def k(kmock: kmock.KubernetesScaffold) -> Iterator[kube.Kube]:
    config = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    config.retries = 0
    with k8s.ApiClient(config) as api:
        yield kube.Kube(api, clock=lambda: NOW, timeout_s=10)


def script(kmock: kmock.KubernetesScaffold, *, crds: list[str], pods: list[dict[str, Any]]) -> None:
    """Nothing live (GETs 404 by default), these CRDs and pods; writes echo their bodies."""
    kmock["list", CRDS] << {"metadata": {}, "items": [{"metadata": {"name": n}} for n in crds]}
    kmock["list", PODS] << {"metadata": {}, "items": pods}
    kmock["patch", BACKENDS, kmock.subresource("status")] << (lambda req: req.data)
    kmock["post", EVENTS] << (lambda req: req.data)
    kmock["patch"] << (lambda req: req.data)


def applied(kmock: kmock.KubernetesScaffold) -> list[dict[str, Any]]:
    return [r.data for r in kmock["patch"] if r.headers["Content-Type"] == "application/apply-patch+yaml"]


def status_patches(kmock: kmock.KubernetesScaffold) -> list[dict[str, Any]]:
    return [r.data["status"] for r in kmock["patch"] if r.subresource == "status"]


async def test_lmcache_backend_applies_the_plan_and_writes_status(
    kmock: kmock.KubernetesScaffold,
    k: kube.Kube,
    samples: dict[str, dict[str, Any]],
    our_crds: dict[str, dict[str, Any]],
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_lmcache.yaml"])
    script(kmock, crds=[], pods=[ENGINE_POD])
    outcome = await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)

    plan = backend.desired_backend(cr, backend.Observed(pods=(ENGINE_POD,)), SETTINGS.backend, NOW)
    assert [o["kind"] for o in plan.objects] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    assert applied(kmock) == list(plan.objects)
    assert outcome.applied == ("Deployment/lmcache", "Service/lmcache", "HorizontalPodAutoscaler/lmcache")
    paths = [r.url.path for r in kmock["patch"] if r.subresource is None]
    assert paths == [
        f"/apis/apps/v1/namespaces/{NS}/deployments/lmcache",
        f"/api/v1/namespaces/{NS}/services/lmcache",
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/lmcache",
    ]
    (status,) = status_patches(kmock)
    assert status == {
        **plan.status,
        "gateway": {"emitted": [], "skipped": []},
        "observedGeneration": 3,
    }
    assert status["matchedEnginePods"] == 1
    live = {**cr, "status": {k_: v for k_, v in status.items() if v is not None}}
    assert crd_validate.validate(live, our_crds["CacheBackend"]) == []
    posted = [(e.data["type"], e.data["reason"]) for e in kmock["post", EVENTS]]
    assert posted == [(e.type, e.reason) for e in plan.events]
    assert outcome.requeue_after_s == plan.requeue_after_s == SETTINGS.backend.resync_s


@pytest.mark.parametrize("installed", [True, False])
async def test_inferencepool_backend(
    kmock: kmock.KubernetesScaffold,
    k: kube.Kube,
    samples: dict[str, dict[str, Any]],
    our_crds: dict[str, dict[str, Any]],
    installed: bool,
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_inferencepool.yaml"])
    crds = [gateway.INFERENCE_POOL_CRD] if installed else ["httproutes.gateway.networking.k8s.io"]
    script(kmock, crds=crds, pods=[ENGINE_POD])
    await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)

    gw = gateway.desired_gateway_objects(cr, SETTINGS.gateway, frozenset(crds))
    assert applied(kmock) == gw.objects  # type None: no managed children, only the pool
    (status,) = status_patches(kmock)
    if installed:
        assert [o["kind"] for o in gw.objects] == ["InferencePool"]
        assert kmock["patch", POOLS][0].url.path == (
            f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools/routing-inferencepool"
        )
        assert status["gateway"] == {
            "emitted": [{"kind": "InferencePool", "name": "routing-inferencepool"}],
            "skipped": [],
        }
    else:
        assert gw.objects == []
        assert status["gateway"]["emitted"] == []
        (skipped,) = status["gateway"]["skipped"]
        assert skipped["kind"] == "InferencePool"
        assert gateway.INFERENCE_POOL_CRD in skipped["reason"]
    assert status["observedGeneration"] == 3
    live = {**cr, "status": {k_: v for k_, v in status.items() if v is not None}}
    assert crd_validate.validate(live, our_crds["CacheBackend"]) == []


async def test_failed_deployment_apply_stops_and_keeps_generation(
    kmock: kmock.KubernetesScaffold, k: kube.Kube, samples: dict[str, dict[str, Any]]
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_lmcache.yaml"])
    kmock["patch", DEPLOYMENTS] << 409 << status_body(409)
    script(kmock, crds=[], pods=[])
    outcome = await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)
    assert outcome.applied == ()
    assert len(kmock["patch", SERVICES]) == 0  # never exposed without its Deployment
    (status,) = status_patches(kmock)
    assert "observedGeneration" not in status


async def test_failed_gateway_apply_is_skipped_with_the_reason(
    kmock: kmock.KubernetesScaffold, k: kube.Kube, samples: dict[str, dict[str, Any]]
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_inferencepool.yaml"])
    kmock["patch", POOLS] << 422 << status_body(422)
    script(kmock, crds=[gateway.INFERENCE_POOL_CRD], pods=[])
    await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)
    (status,) = status_patches(kmock)
    assert status["gateway"]["emitted"] == []
    (skipped,) = status["gateway"]["skipped"]
    assert skipped["kind"] == "InferencePool" and "scripted 422" in skipped["reason"]
    assert "observedGeneration" not in status


def pool(labels: dict[str, str], owner_uid: str) -> dict[str, Any]:
    owner = {"apiVersion": backend.API_VERSION, "kind": "CacheBackend", "name": "x", "uid": owner_uid}
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {
            "name": "routing-inferencepool",
            "namespace": NS,
            "labels": labels,
            "ownerReferences": [owner | {"controller": True}],
        },
    }


@pytest.mark.parametrize(
    ("live", "deleted"),
    [
        (pool({backend.MANAGED_BY_LABEL: backend.MANAGED_BY}, UID), True),
        (pool({backend.MANAGED_BY_LABEL: backend.MANAGED_BY}, "someone-else"), False),
        (pool({}, UID), False),
    ],
)
async def test_gateway_objects_no_longer_emitted_are_pruned_when_ours(
    kmock: kmock.KubernetesScaffold,
    k: kube.Kube,
    samples: dict[str, dict[str, Any]],
    live: dict[str, Any],
    deleted: bool,
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_inferencepool.yaml"])
    cr["spec"]["gateway"]["mode"] = "None"
    cr["status"] = {"gateway": {"emitted": [{"kind": "InferencePool", "name": "routing-inferencepool"}]}}
    kmock["get", POOLS, kmock.name("routing-inferencepool")] << live
    kmock["delete", POOLS] << live
    script(kmock, crds=[gateway.INFERENCE_POOL_CRD], pods=[])
    outcome = await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)
    assert len(kmock["delete", POOLS]) == int(deleted)
    assert ("InferencePool/routing-inferencepool" in outcome.deleted) is deleted
    (status,) = status_patches(kmock)
    assert status["gateway"] == {"emitted": [], "skipped": []}


def test_stale_gateway_refs() -> None:
    cr = {
        "metadata": {"namespace": NS, "name": "b"},
        "status": {
            "gateway": {
                "emitted": [
                    {"kind": "EnvoyExtensionPolicy", "name": "b"},
                    {"kind": "BackendTrafficPolicy", "name": "b"},
                    {"kind": "Unknown", "name": "b"},
                ]
            }
        },
    }
    plan = gateway.GatewayPlan(emitted=[gateway.Emitted(kind="EnvoyExtensionPolicy", name="b")])
    assert handlers_backend.stale_gateway_refs(cr, plan) == (
        backend.ObjectRef("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy", NS, "b"),
    )
    assert handlers_backend.stale_gateway_refs({"metadata": {"namespace": NS}}, plan) == ()


async def test_failed_read_is_a_kopf_retry(
    kmock: kmock.KubernetesScaffold, k: kube.Kube, samples: dict[str, dict[str, Any]]
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_lmcache.yaml"])
    kmock["list", PODS] << 503 << status_body(503)
    with pytest.raises(kopf.TemporaryError, match="scripted 503"):
        await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)
    assert len(kmock["patch"]) == 0


async def test_backend_deleted_meanwhile_is_not_an_error(
    kmock: kmock.KubernetesScaffold, k: kube.Kube, samples: dict[str, dict[str, Any]]
) -> None:
    cr = as_live(samples["cache_v1alpha1_cachebackend_lmcache.yaml"])
    kmock["patch", BACKENDS, kmock.subresource("status")] << 404 << status_body(404)
    script(kmock, crds=[], pods=[])
    outcome = await asyncio.to_thread(handlers_backend.reconcile, k, cr, SETTINGS, NOW)
    assert outcome.applied  # the children were written; only the status had nowhere to go


def test_register_adds_the_handlers() -> None:
    registry = kopf.OperatorRegistry()
    handlers_backend.register(registry, kube.Kube(k8s.ApiClient()), SETTINGS)
    resource = kopf.Resource(backend.GROUP, "v1alpha1", "cachebackends")
    ids = {h.id for h in registry._changing.get_all_handlers()} | {
        h.id for h in registry._spawning.get_all_handlers()
    }
    assert ids == {"reconcile-create", "reconcile-update", "reconcile-resume", "reconcile-timer"}
    assert registry._changing.has_handlers(resource=resource)
