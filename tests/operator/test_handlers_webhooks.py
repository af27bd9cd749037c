"""operator/handlers_webhooks.py through kopf's own admission machinery: a real
``kopf.WebhookServer`` (plain HTTP on 127.0.0.1) serving ``serve_admission_request`` over a
registry holding only our handlers; AdmissionReview v1 JSON is POSTed to the paths of
config/webhook/manifests.yaml, the JSONPatch in the response is applied with jsonpatch, and
the CacheBackend/CachePolicy/CacheTenant reads go through the real ``Kube`` to kmock."""

from __future__ import annotations

import base64
import functools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import kopf
import pytest
import yaml
from kopf._cogs.structs.references import Insights, Resource
from kopf._core.engines.admission import serve_admission_request
from kopf._core.engines.indexing import OperatorIndexers
from kopf._core.reactor.inventory import ResourceMemories
from kubernetes import client as k8s

from inference_cache.operator import crds, handlers_webhooks, kube, webhook
from inference_cache.operator.webhook import ANNOTATION_INJECTED_BY, WebhookSettings

NS = "team-a"
V = "inferencecache.io/v1alpha1"
BACKENDS = kmock.resource("inferencecache.io", "v1alpha1", "cachebackends")
POLICIES = kmock.resource("inferencecache.io", "v1alpha1", "cachepolicies")
TENANTS = kmock.resource("inferencecache.io", "v1alpha1", "cachetenants")
SETTINGS = WebhookSettings(signing_key=b"k")
MANIFESTS = Path(__file__).resolve().parents[2] / "config" / "webhook" / "manifests.yaml"
FORGED = {ANNOTATION_INJECTED_BY: "team-a/someone-else"}


def status(code: int, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "message": message}


def engine_pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"generateName": "qwen-5c9f-", "namespace": NS, "labels": {"app": "qwen"}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.11.0",
                    "command": ["vllm", "serve"],
                    "args": ["Qwen/Qwen3-0.6B", "--port", "8000"],
                }
            ]
        },
    }


def backend(name: str = "qwen", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "None",
        "engineSelector": {"matchLabels": {"app": "qwen"}},
        "integration": {"engine": "vllm"},
    }
    body.update(spec)
    return {
        "apiVersion": V,
        "kind": "CacheBackend",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
        "spec": body,
    }


def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": V, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


# -- kopf's webhook server over our handlers ---------------------------------------------------


@pytest.fixture(autouse=True)
def declared(kmock: kmock.KubernetesEmulator) -> None:
    for plural in ("cachebackends", "cachepolicies", "cachetenants"):
        kmock.resources[f"inferencecache.io/v1alpha1/{plural}"] = kmock.ResourceInfo(namespaced=True)


@pytest.fixture
def registry(api: k8s.ApiClient) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    handlers_webhooks.register(registry, kube.Kube(api, timeout_s=10), SETTINGS)
    return registry


@pytest.fixture
async def admit(registry: kopf.OperatorRegistry, unused_tcp_port: int) -> AsyncIterator[Any]:
    """``await admit(path, request)`` -> the AdmissionReview response, via HTTP."""
    insights = Insights()
    insights.webhook_resources.update(
        {
            Resource("", "v1", "pods", kind="Pod", namespaced=True),
            Resource("inferencecache.io", "v1alpha1", "cachebackends", kind="CacheBackend", namespaced=True),
            Resource("inferencecache.io", "v1alpha1", "cachepolicies", kind="CachePolicy", namespaced=True),
            Resource("inferencecache.io", "v1alpha1", "cachetenants", kind="CacheTenant", namespaced=True),
        }
    )
    fn = functools.partial(
        serve_admission_request,
        settings=kopf.OperatorSettings(),
        memories=ResourceMemories(),
        memobase=kopf.Memo(),
        registry=registry,
        insights=insights,
        indices=OperatorIndexers().indices,
    )
    server = kopf.WebhookServer(addr="127.0.0.1", port=unused_tcp_port, host="127.0.0.1", insecure=True)
    configs = server(fn)
    config = await anext(configs)
    base = str(config["url"]).rstrip("/")
    async with aiohttp.ClientSession() as session:

        async def call(path: str, request: dict[str, Any]) -> dict[str, Any]:
            async with session.post(f"{base}{path}", json=request) as r:
                assert r.status == 200, await r.text()
                response: dict[str, Any] = (await r.json())["response"]
            assert response["uid"] == request["request"]["uid"]
            return response

        try:
            yield call
        finally:
            await configs.aclose()  # type: ignore[attr-defined]


def review(
    resource: str, operation: str, new: dict[str, Any], old: dict[str, Any] | None = None
) -> dict[str, Any]:
    group, _, version = new["apiVersion"].rpartition("/")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": new["kind"]},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": NS,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": new,
            "oldObject": old,
            "dryRun": False,
        },
    }


def patched(original: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return original
    assert response["patchType"] == "JSONPatch"
    ops = yaml.safe_load(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(original, ops)
    return result


# -- routing -------------------------------------------------------------------------------------


def test_handler_ids_are_the_webhook_paths_of_the_manifests(registry: kopf.OperatorRegistry) -> None:
    docs = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    paths = {w["clientConfig"]["service"]["path"] for d in docs for w in d["webhooks"]}
    assert paths == {f"/{i}" for i in handlers_webhooks.WEBHOOK_IDS}
    assert {h.id for h in registry._webhooks.get_all_handlers()} == set(handlers_webhooks.WEBHOOK_IDS)
    rules = {
        w["clientConfig"]["service"]["path"]: set(w["rules"][0]["operations"])
        for d in docs
        for w in d["webhooks"]
    }
    for h in registry._webhooks.get_all_handlers():
        assert set(h.operations or ()) == rules[f"/{h.id}"], h.id


# -- the Pod webhook ------------------------------------------------------------------------------


async def test_pod_is_injected_as_the_pure_function_says(kmock: kmock.KubernetesEmulator, admit: Any) -> None:
    kmock.objects[BACKENDS, NS, "qwen"] = backend()
    pod = engine_pod(FORGED)
    response = await admit("/mutate--v1-pod", review("pods", "CREATE", pod))
    assert response["allowed"] is True
    got = patched(pod, response)
    expected = jsonpatch.apply_patch(pod, webhook.mutate_engine_pod(pod, backend(), SETTINGS).patch)
    assert got == expected
    assert got["metadata"]["annotations"][ANNOTATION_INJECTED_BY] == f"{NS}/qwen"
    assert "--kv-events-config" in got["spec"]["containers"][0]["args"]
    assert webhook.verify_injection(got, SETTINGS)
    (req,) = kmock["list", BACKENDS]
    assert req.url.path == f"/apis/inferencecache.io/v1alpha1/namespaces/{NS}/cachebackends"
    again = await admit("/mutate--v1-pod", review("pods", "CREATE", got))  # idempotent
    assert "patch" not in again


async def test_pod_fails_open_when_backends_cannot_be_listed(
    kmock: kmock.KubernetesEmulator, admit: Any
) -> None:
    kmock["list", BACKENDS] << 503 << status(503, "etcd is down")
    pod = engine_pod(FORGED)
    response = await admit("/mutate--v1-pod", review("pods", "CREATE", pod))
    assert response["allowed"] is True
    assert any("cannot list CacheBackends" in w and "etcd is down" in w for w in response["warnings"])
    got = patched(pod, response)
    assert ANNOTATION_INJECTED_BY not in (got["metadata"].get("annotations") or {})  # forgery removed
    assert got["spec"] == pod["spec"]


async def test_pod_fails_open_on_an_internal_error(
    kmock: kmock.KubernetesEmulator, admit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(webhook, "select_backend", boom)
    pod = engine_pod()
    response = await admit("/mutate--v1-pod", review("pods", "CREATE", pod))
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == [
        "inference-cache: engine injection skipped (internal error: RuntimeError)"
    ]


async def test_pod_patch_that_does_not_apply_is_a_warning_not_a_denial(
    kmock: kmock.KubernetesEmulator, admit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = webhook.Mutation(patch=[{"op": "remove", "path": "/spec/nope"}])
    monkeypatch.setattr(webhook, "mutate_engine_pod", lambda *_: bad)
    response = await admit("/mutate--v1-pod", review("pods", "CREATE", engine_pod()))
    assert response["allowed"] is True
    assert "patch" not in response
    assert any("internal error: JsonPatchPathNotFound" in w for w in response["warnings"])


# -- CacheBackend -----------------------------------------------------------------------------------


async def test_cache_backend_defaults_come_from_the_crd(admit: Any) -> None:
    minimal = obj("CacheBackend", "qwen", {"replicas": 2, "autoscaling": {"maxReplicas": 4}})
    response = await admit(
        "/mutate-inferencecache-io-v1alpha1-cachebackend", review("cachebackends", "CREATE", minimal)
    )
    assert response["allowed"] is True
    got = patched(minimal, response)
    assert got == jsonpatch.apply_patch(minimal, webhook.default_cache_backend(minimal, crds.cache_backend()))
    assert got["spec"]["autoscaling"]["minReplicas"] == 2
    assert got["spec"]["gateway"]["mode"] == "None"


async def test_cache_backend_validation_denies_with_the_field_errors(admit: Any) -> None:
    invalid = obj("CacheBackend", "ext", {"type": "External", "integration": {"engine": "vllm"}})
    response = await admit(
        "/validate-inferencecache-io-v1alpha1-cachebackend", review("cachebackends", "CREATE", invalid)
    )
    errors = webhook.validate_cache_backend(invalid)
    assert errors
    assert response["allowed"] is False
    assert response["status"] == {
        "message": webhook.format_errors("CacheBackend", "ext", errors),
        "code": 422,
    }
    valid = backend()
    ok = await admit(
        "/validate-inferencecache-io-v1alpha1-cachebackend", review("cachebackends", "UPDATE", valid, valid)
    )
    assert ok["allowed"] is True and "status" not in ok


# -- CachePolicy, CacheTenant: fail closed ------------------------------------------------------------


async def test_second_cache_policy_in_a_namespace_is_denied(
    kmock: kmock.KubernetesEmulator, admit: Any
) -> None:
    kmock.objects[POLICIES, NS, "first"] = obj("CachePolicy", "first", {})
    path = "/validate-inferencecache-io-v1alpha1-cachepolicy"
    second = obj("CachePolicy", "second", {"evictionTTL": "10m"})
    response = await admit(path, review("cachepolicies", "CREATE", second))
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert "already has CachePolicy 'first'" in response["status"]["message"]
    lists = len(kmock["list"])
    update = await admit(
        path,
        review(
            "cachepolicies",
            "UPDATE",
            obj("CachePolicy", "first", {"evictionTTL": "5m"}),
            obj("CachePolicy", "first", {}),
        ),
    )
    assert update["allowed"] is True
    assert len(kmock["list"]) == lists  # UPDATE checks the spec only


async def test_policy_and_tenant_checks_fail_closed_when_listing_fails(
    kmock: kmock.KubernetesEmulator, admit: Any
) -> None:
    kmock["list", POLICIES] << 403 << status(403, "cachepolicies is forbidden")
    kmock["list", TENANTS] << 503 << status(503, "etcd is down")
    policy = await admit(
        "/validate-inferencecache-io-v1alpha1-cachepolicy",
        review("cachepolicies", "CREATE", obj("CachePolicy", "p", {})),
    )
    tenant = await admit(
        "/validate-inferencecache-io-v1alpha1-cachetenant",
        review("cachetenants", "CREATE", obj("CacheTenant", "t", {"tenantID": "acme"})),
    )
    for response, reason in ((policy, "cachepolicies is forbidden"), (tenant, "etcd is down")):
        assert response["allowed"] is False
        assert response["status"]["code"] == 503
        assert (
            "cannot be checked" in response["status"]["message"] and reason in response["status"]["message"]
        )


async def test_duplicate_tenant_id_is_denied_and_an_unchanged_one_is_not_rechecked(
    kmock: kmock.KubernetesEmulator, admit: Any
) -> None:
    kmock.objects[TENANTS, NS, "a"] = obj("CacheTenant", "a", {"tenantID": "acme"})
    path = "/validate-inferencecache-io-v1alpha1-cachetenant"
    dup = obj("CacheTenant", "b", {"tenantID": "acme"})
    response = await admit(path, review("cachetenants", "CREATE", dup))
    assert response["allowed"] is False
    assert "already used by CacheTenant 'a'" in response["status"]["message"]
    fresh = await admit(
        path, review("cachetenants", "CREATE", obj("CacheTenant", "c", {"tenantID": "other"}))
    )
    assert fresh["allowed"] is True
    lists = len(kmock["list"])
    same = obj("CacheTenant", "a", {"tenantID": "acme", "quota": {"maxIndexEntries": 5}})
    update = await admit(
        path, review("cachetenants", "UPDATE", same, obj("CacheTenant", "a", {"tenantID": "acme"}))
    )
    assert update["allowed"] is True
    assert len(kmock["list"]) == lists
