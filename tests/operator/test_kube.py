"""operator/kube.py against kmock (the mock API server kopf's own tests use): the requests
the adapter makes (paths, verbs, content types, query) and the translation of API errors
into the KubeError table. The adapter is synchronous, so each call runs in a thread while
the mock serves on the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any

import kmock
import pytest
from kubernetes import client as k8s

from inference_cache.operator import kube

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
BACKENDS = kmock.resource("inferencecache.io", "v1alpha1", "cachebackends")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
EVENTS = kmock.resource("", "v1", "events")


#: Stateless mock: only scripted responses (the emulator 404s an apply of a new object).
scripted = pytest.mark.kmock(cls=kmock.KubernetesScaffold)


def status(code: int, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "message": message}


@pytest.fixture
def k(api: k8s.ApiClient) -> kube.Kube:
    return kube.Kube(api, clock=lambda: NOW, timeout_s=10)


def test_paths_and_plurals() -> None:
    assert kube.resource_path("v1", "Pod", "ns", "p") == "/api/v1/namespaces/ns/pods/p"
    assert kube.resource_path("apps/v1", "Deployment", "ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert (
        kube.resource_path("inferencecache.io/v1alpha1", "CacheIndex", None, "cluster-default", "status")
        == "/apis/inferencecache.io/v1alpha1/cacheindices/cluster-default/status"
    )
    assert kube.plural("EnvoyExtensionPolicy") == "envoyextensionpolicies"
    assert kube.plural("HorizontalPodAutoscaler") == "horizontalpodautoscalers"
    assert kube.plural("Ingress") == "ingresses"
    assert kube.plural("Endpoints") == "endpoints"
    assert kube.selector_string({"b": "2", "a": "1"}) == "a=1,b=2"


@scripted
async def test_apply_is_forced_server_side_apply(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    stamp = {"uid": "1"}
    kmock["patch", DEPLOYMENTS] << (lambda req: {**req.data, "metadata": {**req.data["metadata"], **stamp}})
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}}
    stored = await asyncio.to_thread(k.apply, obj)
    assert stored["metadata"]["uid"] == "1"
    (req,) = kmock["patch"]
    assert req.url.path == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert req.headers["Content-Type"] == "application/apply-patch+yaml"
    assert req.params == {"fieldManager": "inference-cache-operator", "force": "true"}
    assert req.data == obj


async def test_get_returns_the_object_or_none(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock.objects[DEPLOYMENTS, "ns", "d"] = {"metadata": {"name": "d", "namespace": "ns"}, "spec": {"x": 1}}
    got = await asyncio.to_thread(k.get, "apps/v1", "Deployment", "ns", "d")
    assert got is not None and got["spec"] == {"x": 1}
    assert await asyncio.to_thread(k.get, "apps/v1", "Deployment", "ns", "missing") is None


async def test_list_fills_kind_and_passes_the_selector(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock["list", DEPLOYMENTS, kmock.namespace("ns")] << {
        "metadata": {},
        "items": [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}],
    }
    items = await asyncio.to_thread(
        k.list, "apps/v1", "Deployment", namespace="ns", label_selector={"app": "x", "tier": "y"}
    )
    assert [(i["apiVersion"], i["kind"], i["metadata"]["name"]) for i in items] == [
        ("apps/v1", "Deployment", "a"),
        ("apps/v1", "Deployment", "b"),
    ]
    (req,) = kmock["list"]
    assert req.params["labelSelector"] == "app=x,tier=y"


async def test_list_follows_continue_tokens(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock["list", DEPLOYMENTS, kmock.params(**{"continue": "t1"})] << {
        "metadata": {},
        "items": [{"metadata": {"name": "b"}}],
    }
    kmock["list", DEPLOYMENTS] << {"metadata": {"continue": "t1"}, "items": [{"metadata": {"name": "a"}}]}
    items = await asyncio.to_thread(k.list, "apps/v1", "Deployment")
    assert [i["metadata"]["name"] for i in items] == ["a", "b"]
    assert [r.url.path for r in kmock["list"]] == ["/apis/apps/v1/deployments"] * 2


async def test_delete_true_then_false_on_404(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock.objects[DEPLOYMENTS, "ns", "d"] = {"metadata": {"name": "d", "namespace": "ns"}}
    assert await asyncio.to_thread(k.delete, "apps/v1", "Deployment", "ns", "d") is True
    assert await asyncio.to_thread(k.delete, "apps/v1", "Deployment", "ns", "d") is False
    assert kmock["delete"][0].data == {"propagationPolicy": "Background"}


async def test_patch_status_merges_through_the_subresource(
    kmock: kmock.KubernetesEmulator, k: kube.Kube
) -> None:
    kmock.objects[BACKENDS, "ns", "b"] = {"metadata": {"name": "b", "namespace": "ns"}, "status": {"a": 1}}
    await asyncio.to_thread(k.patch_status, "inferencecache.io/v1alpha1", "CacheBackend", "ns", "b", {"x": 2})
    (req,) = kmock["patch"]
    assert req.url.path == "/apis/inferencecache.io/v1alpha1/namespaces/ns/cachebackends/b/status"
    assert req.subresource == "status"
    assert req.headers["Content-Type"] == "application/merge-patch+json"
    assert req.data == {"status": {"x": 2}}
    assert kmock.objects[BACKENDS, "ns", "b"]["status"] == {"a": 1, "x": 2}


@pytest.mark.parametrize(
    ("patch_type", "content_type"),
    [("merge", "application/merge-patch+json"), ("strategic", "application/strategic-merge-patch+json")],
)
async def test_patch_sends_the_patch_with_its_content_type(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, patch_type: kube.PatchType, content_type: str
) -> None:
    kmock.objects[DEPLOYMENTS, "ns", "d"] = {"metadata": {"name": "d", "namespace": "ns"}, "spec": {"a": 1}}
    patch = {"spec": {"b": 2}}
    stored = await asyncio.to_thread(
        k.patch, "apps/v1", "Deployment", "ns", "d", patch, patch_type=patch_type
    )
    (req,) = kmock["patch"]
    assert req.url.path == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert req.headers["Content-Type"] == content_type
    assert req.data == patch
    assert stored["spec"] == {"a": 1, "b": 2}


async def test_create_and_conflict(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}}
    created = await asyncio.to_thread(k.create, obj)
    assert created["metadata"]["name"] == "d"
    assert kmock["post"][0].url.path == "/apis/apps/v1/namespaces/ns/deployments"
    with pytest.raises(kube.Conflict) as err:
        await asyncio.to_thread(k.create, obj)
    assert err.value.status == 409


@scripted
@pytest.mark.parametrize(
    ("code", "error"),
    [
        (400, kube.Invalid),
        (401, kube.Forbidden),
        (403, kube.Forbidden),
        (404, kube.NotFound),
        (409, kube.Conflict),
        (410, kube.Gone),
        (422, kube.Invalid),
        (429, kube.Unavailable),
        (500, kube.Unavailable),
        (503, kube.Unavailable),
    ],
)
async def test_errors_are_translated_once(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, code: int, error: type[kube.KubeError]
) -> None:
    kmock["patch", DEPLOYMENTS] << code << status(code, f"scripted {code}")
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}}
    with pytest.raises(kube.KubeError) as err:
        await asyncio.to_thread(k.apply, obj)
    assert type(err.value) is error
    assert err.value.status == code
    assert f"scripted {code}" in str(err.value)
    assert isinstance(err.value.__cause__, k8s.ApiException) or err.value.__cause__ is None


@scripted
async def test_non_status_error_bodies_are_not_echoed(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock["patch", DEPLOYMENTS] << 422 << {"secret": "what we sent"}
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}}
    with pytest.raises(kube.Invalid) as err:
        await asyncio.to_thread(k.apply, obj)
    assert "what we sent" not in str(err.value)


def test_connection_failure_is_unavailable(unused_tcp_port: int) -> None:
    config = k8s.Configuration(host=f"http://127.0.0.1:{unused_tcp_port}")
    config.retries = 0
    with k8s.ApiClient(config) as api, pytest.raises(kube.Unavailable):
        kube.Kube(api, timeout_s=5).get("v1", "Pod", "ns", "p")


@scripted
async def test_list_versioned_returns_the_lists_resource_version(
    kmock: kmock.KubernetesEmulator, k: kube.Kube
) -> None:
    kmock["list", DEPLOYMENTS] << {
        "metadata": {"resourceVersion": "42"},
        "items": [{"metadata": {"name": "a"}}],
    }
    items, version = await asyncio.to_thread(k.list_versioned, "apps/v1", "Deployment")
    assert version == "42"
    assert [(i["kind"], i["metadata"]["name"]) for i in items] == [("Deployment", "a")]


@scripted
async def test_watch_streams_events_from_a_resource_version(
    kmock: kmock.KubernetesEmulator, k: kube.Kube
) -> None:
    kmock["watch", DEPLOYMENTS] << (
        {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "43"}}},
        b"\n",
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "44"}}},
    )

    def read() -> list[dict[str, Any]]:
        return list(k.watch("apps/v1", "Deployment", namespace="ns", resource_version="42", timeout_s=60))

    events = await asyncio.to_thread(read)
    assert [(e["type"], e["object"]["kind"], e["object"]["metadata"]["resourceVersion"]) for e in events] == [
        ("ADDED", "Deployment", "43"),
        ("BOOKMARK", "Deployment", "44"),
    ]
    (req,) = kmock["watch"]
    assert req.url.path == "/apis/apps/v1/namespaces/ns/deployments"
    assert req.params == {
        "watch": "true",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "60",
        "resourceVersion": "42",
    }


@scripted
@pytest.mark.parametrize(("code", "error"), [(410, kube.Gone), (500, kube.Unavailable)])
async def test_a_watch_error_event_raises(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, code: int, error: type[kube.KubeError]
) -> None:
    kmock["watch", DEPLOYMENTS] << ({"type": "ERROR", "object": status(code, "too old resource version")},)
    with pytest.raises(error, match="too old resource version"):
        await asyncio.to_thread(lambda: list(k.watch("apps/v1", "Deployment", resource_version="1")))


async def test_closing_a_watch_unblocks_its_reader(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    """The emulator's watch never ends by itself: only close() lets the reader go."""
    kmock.objects[DEPLOYMENTS, "ns", "a"] = {"metadata": {"name": "a", "namespace": "ns"}}
    stream = await asyncio.to_thread(k.watch, "apps/v1", "Deployment")
    events = iter(stream)
    first = await asyncio.to_thread(next, events)
    assert first["object"]["metadata"]["name"] == "a"
    blocked = asyncio.ensure_future(asyncio.to_thread(lambda: list(events)))
    stream.close()
    async with asyncio.timeout(10):
        with contextlib.suppress(kube.Unavailable):  # ended or broken: either way released
            assert await blocked == []


async def test_post_event(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock["post", EVENTS] << (lambda req: req.data)
    involved = {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "metadata": {"name": "b", "namespace": "ns", "uid": "u", "resourceVersion": "7"},
    }
    await asyncio.to_thread(k.post_event, involved, "Warning", "BackendDegraded", "x" * 2000)
    (req,) = kmock["post"]
    assert req.url.path == "/api/v1/namespaces/ns/events"
    event = req.data
    assert event["metadata"] == {"generateName": "b.", "namespace": "ns"}
    assert event["involvedObject"] == {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "name": "b",
        "namespace": "ns",
        "uid": "u",
        "resourceVersion": "7",
    }
    assert (event["type"], event["reason"], len(event["message"])) == ("Warning", "BackendDegraded", 1024)
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-01-02T03:04:05Z"


async def test_post_event_failure_is_logged_not_raised(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, caplog: pytest.LogCaptureFixture
) -> None:
    kmock["post", EVENTS] << 403 << status(403, "events is forbidden")
    involved = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}}
    await asyncio.to_thread(k.post_event, involved, "Normal", "R", "m")
    assert "events is forbidden" in caplog.text


async def test_crd_names(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock["list", CRDS] << {
        "metadata": {},
        "items": [{"metadata": {"name": "inferencepools.inference.networking.k8s.io"}}],
    }
    assert await asyncio.to_thread(k.crd_names) == frozenset({"inferencepools.inference.networking.k8s.io"})
    assert kmock["list"][0].url.path == "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@pytest.mark.parametrize("code", [403, 404])
async def test_crd_names_empty_when_not_allowed(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    kmock["list", CRDS] << code << status(code, "nope")
    assert await asyncio.to_thread(k.crd_names) == frozenset()
    assert "cannot list CustomResourceDefinitions" in caplog.text


async def test_crd_names_raises_when_unavailable(kmock: kmock.KubernetesEmulator, k: kube.Kube) -> None:
    kmock["list", CRDS] << 503 << status(503, "etcd")
    with pytest.raises(kube.Unavailable):
        await asyncio.to_thread(k.crd_names)
