"""CacheBackend reconcile decisions (``inference_cache.operator.backend.desired_backend``).

We test, table-driven and with an injected clock: the children each ``spec.type`` yields
(managed LMCache Deployment/Service/HPA, External passthrough, None, unmanaged kinds) and
that every emitted Deployment/Service/HPA passes the Kubernetes 1.31 schema strictly; the
shedding rule (only our labelled + owner-referenced children are deleted); Ready/Degraded/
Progressing with the original's reasons; the first-KV-event gate fed from a real index's
``/snapshot`` through ``controlplane.backend_participation``; ``matchedEnginePods``; and
transition-only Events. Nothing is mocked: the function is pure.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import kubernetes_validate
import pytest

from inference_cache.index import snapshot, store, types
from inference_cache.operator import backend as bk
from inference_cache.operator import controlplane as cp
from inference_cache.operator import crds

from . import crd_validate as cv

UID = "0c6f2d1e-5a4b-4c3d-9e8f-7a6b5c4d3e2f"
NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
SETTINGS = bk.BackendSettings()


def cr(
    name: str = "cache",
    namespace: str = "llm",
    status: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": UID, "generation": 3}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "metadata": meta,
        "spec": {"engineSelector": {"matchLabels": {"app": "vllm"}}, **spec},
        "status": status or {},
    }


def pod(name: str, ip: str, *, ready: bool = True, namespace: str = "llm", **labels: str) -> dict[str, Any]:
    """A pod; with the default labels an engine pod of ``cache`` as its webhook left it
    (annotated ``injected-by``)."""
    annotations = {} if labels else {bk.INJECTED_BY_ANNOTATION: f"{namespace}/cache"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels or {"app": "vllm"},
            "annotations": annotations,
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def live(obj: dict[str, Any], **status: Any) -> dict[str, Any]:
    """What the apiserver returns for an applied object: generation + status."""
    out = copy.deepcopy(obj)
    out["metadata"]["generation"] = 2
    out["status"] = status
    return out


def rolled_out(plan: bk.BackendPlan, replicas: int = 1, available: int | None = None) -> bk.Observed:
    dep, svc, *rest = plan.objects
    avail = replicas if available is None else available
    return bk.Observed(
        deployment=live(
            dep, observedGeneration=2, replicas=replicas, updatedReplicas=replicas, availableReplicas=avail
        ),
        service=live(svc),
        hpa=live(rest[0]) if rest else None,
        pods=(pod("vllm-0", "10.0.0.7"),),
    )


def validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, "1.31", strict=True)
    except kubernetes_validate.ValidationError as e:  # keep the report readable
        pytest.fail(f"{obj['kind']} invalid: {str(e).splitlines()[0]}")


def conditions(plan: bk.BackendPlan) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in plan.status["conditions"]}


def reasons(plan: bk.BackendPlan) -> list[str]:
    return [e.reason for e in plan.events]


def with_status(backend: dict[str, Any], plan: bk.BackendPlan) -> dict[str, Any]:
    """Apply the plan's status merge patch to the CR (what the handler does); the result
    must pass our CacheBackend CRD."""
    out = copy.deepcopy(backend)
    for k, v in plan.status.items():
        if v is None:
            out["status"].pop(k, None)
        else:
            out["status"][k] = v
    assert cv.validate(out, crds.cache_backend()) == []
    return out


# -- children ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kinds"),
    [
        pytest.param({}, ["Deployment", "Service"], id="lmcache-default-type"),
        pytest.param({"type": "LMCache", "replicas": 2}, ["Deployment", "Service"], id="lmcache"),
        pytest.param(
            {"type": "LMCache", "autoscaling": {"minReplicas": 2, "maxReplicas": 5}},
            ["Deployment", "Service", "HorizontalPodAutoscaler"],
            id="lmcache-autoscaling",
        ),
        pytest.param(
            {
                "backendConfig": {
                    "serverImage": "example.com/lmcache:1",
                    "serverCommand": "lmcache_server 0.0.0.0 65432",
                },
                "template": {
                    "nodeSelector": {"pool": "cpu"},
                    "tolerations": [{"key": "k", "operator": "Exists"}],
                    "serviceAccountName": "cache",
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {"runAsNonRoot": True},
                    "priorityClassName": "high",
                },
            },
            ["Deployment", "Service"],
            id="lmcache-overrides",
        ),
        pytest.param({"type": "External", "endpoint": "lm://cache.example:65432"}, [], id="external"),
        pytest.param({"type": "None"}, [], id="none"),
        pytest.param({"type": "Mooncake"}, [], id="unsupported-type"),
        pytest.param({"deploymentKind": "StatefulSet"}, [], id="statefulset-deferred"),
        pytest.param({"integration": {"engine": "sglang"}}, [], id="sglang-lmcache-unmanaged"),
    ],
)
def test_children_per_type_are_valid_kubernetes_objects(spec: dict[str, Any], kinds: list[str]) -> None:
    backend = cr(**spec)
    assert cv.validate(backend, crds.cache_backend()) == []
    plan = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
    assert [o["kind"] for o in plan.objects] == kinds
    for obj in plan.objects:
        validate(obj)
        meta = obj["metadata"]
        assert (meta["name"], meta["namespace"]) == ("cache", "llm")
        assert meta["labels"][bk.MANAGED_BY_LABEL] == bk.MANAGED_BY
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "inferencecache.io/v1alpha1",
                "kind": "CacheBackend",
                "name": "cache",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_lmcache_server_deployment_and_service() -> None:
    plan = bk.desired_backend(cr(replicas=2), bk.Observed(), SETTINGS, NOW)
    dep, svc = plan.objects
    selector = {
        "app.kubernetes.io/name": "cachebackend",
        "app.kubernetes.io/instance": "cache",
        "app.kubernetes.io/managed-by": bk.MANAGED_BY,
    }
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"] == {"matchLabels": selector}
    assert dep["spec"]["template"]["metadata"]["labels"] == {
        **selector,
        "inferencecache.io/backend-type": "LMCache",
    }
    pod_spec = dep["spec"]["template"]["spec"]
    assert (pod_spec["schedulerName"], pod_spec["terminationGracePeriodSeconds"]) == ("default-scheduler", 30)
    (container,) = pod_spec["containers"]
    assert container["name"] == "lmcache-server"
    assert container["image"] == SETTINGS.server_image
    assert container["command"] + container["args"] == [
        "/opt/venv/bin/lmcache_server",
        "0.0.0.0",
        "65432",
        "cpu",
    ]
    assert container["ports"] == [{"name": "lmcache", "containerPort": 65432, "protocol": "TCP"}]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "lmcache"}
    assert "resources" not in container
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": selector,
        "ports": [{"name": "lmcache", "port": 65432, "targetPort": "lmcache", "protocol": "TCP"}],
    }


def test_overrides_and_server_command() -> None:
    spec = {
        "backendConfig": {
            "serverImage": "example.com/lmcache:1",
            "serverCommand": "lmcache_server  0.0.0.0 65432",
        },
        "template": {"nodeSelector": {"pool": "cpu"}, "terminationGracePeriodSeconds": 5},
    }
    (dep, _svc) = bk.desired_backend(cr(**spec), bk.Observed(), SETTINGS, NOW).objects
    pod_spec = dep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["image"] == "example.com/lmcache:1"
    assert (container["command"], container["args"]) == (["lmcache_server"], ["0.0.0.0", "65432"])
    assert pod_spec["nodeSelector"] == {"pool": "cpu"}
    assert pod_spec["terminationGracePeriodSeconds"] == 5


@pytest.mark.parametrize(
    ("autoscaling", "live_replicas", "replicas", "hpa_min", "cpu"),
    [
        pytest.param({"maxReplicas": 4}, None, 1, 1, 80, id="defaults"),
        pytest.param(
            {"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercent": 60},
            None,
            2,
            2,
            60,
            id="create",
        ),
        pytest.param({"minReplicas": 2, "maxReplicas": 4}, 3, 3, 2, 80, id="hpa-owned-count-kept"),
        pytest.param({"minReplicas": 2, "maxReplicas": 4}, 1, 2, 2, 80, id="clamped-up-to-floor"),
    ],
)
def test_autoscaling(
    autoscaling: dict[str, Any], live_replicas: int | None, replicas: int, hpa_min: int, cpu: int
) -> None:
    backend = cr(autoscaling=autoscaling)
    observed = bk.Observed()
    if live_replicas is not None:
        dep = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW).objects[0]
        dep["spec"]["replicas"] = live_replicas
        observed = bk.Observed(deployment=live(dep))
    dep, _svc, hpa = bk.desired_backend(backend, observed, SETTINGS, NOW).objects
    assert dep["spec"]["replicas"] == replicas
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "250m", "memory": "1Gi"}
    }
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cache"},
        "minReplicas": hpa_min,
        "maxReplicas": 4,
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu}},
            }
        ],
    }


# -- shedding ------------------------------------------------------------------------------


def _owned_children() -> bk.Observed:
    plan = bk.desired_backend(cr(autoscaling={"maxReplicas": 3}), bk.Observed(), SETTINGS, NOW)
    dep, svc, hpa = (live(o) for o in plan.objects)
    return bk.Observed(deployment=dep, service=svc, hpa=hpa)


def _foreign(obj: dict[str, Any] | None, how: str) -> dict[str, Any] | None:
    out = copy.deepcopy(obj)
    assert out is not None
    if how == "label":
        del out["metadata"]["labels"][bk.MANAGED_BY_LABEL]
    elif how == "owner":
        out["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    else:
        out["metadata"]["ownerReferences"][0]["controller"] = False
    return out


@pytest.mark.parametrize(
    ("spec", "deleted"),
    [
        pytest.param(
            {"type": "External", "endpoint": "h:1"},
            ["Deployment", "Service", "HorizontalPodAutoscaler"],
            id="to-external",
        ),
        pytest.param({"type": "None"}, ["Deployment", "Service", "HorizontalPodAutoscaler"], id="to-none"),
        pytest.param(
            {"deploymentKind": "StatefulSet"},
            ["Deployment", "Service", "HorizontalPodAutoscaler"],
            id="to-statefulset",
        ),
        pytest.param(
            {"type": "NIXL"}, ["Deployment", "Service", "HorizontalPodAutoscaler"], id="to-unsupported"
        ),
        pytest.param({}, ["HorizontalPodAutoscaler"], id="autoscaling-removed"),
        pytest.param({"autoscaling": {"maxReplicas": 3}}, [], id="nothing-to-shed"),
    ],
)
def test_shedding_deletes_owned_children(spec: dict[str, Any], deleted: list[str]) -> None:
    plan = bk.desired_backend(cr(**spec), _owned_children(), SETTINGS, NOW)
    assert [(d.kind, d.namespace, d.name) for d in plan.deletes] == [(k, "llm", "cache") for k in deleted]


@pytest.mark.parametrize("how", ["label", "owner", "not-controller"])
def test_shedding_never_deletes_foreign_objects(how: str) -> None:
    owned = _owned_children()
    observed = bk.Observed(
        deployment=_foreign(owned.deployment, how),
        service=_foreign(owned.service, how),
        hpa=_foreign(owned.hpa, how),
    )
    assert bk.desired_backend(cr(type="None"), observed, SETTINGS, NOW).deletes == ()


def test_foreign_deployment_is_never_adopted() -> None:
    owned = _owned_children()
    observed = bk.Observed(deployment=_foreign(owned.deployment, "owner"), service=owned.service)
    plan = bk.desired_backend(cr(), observed, SETTINGS, NOW)
    assert (plan.objects, plan.deletes) == ((), ())
    assert conditions(plan)["Ready"] == ("False", "OwnershipConflict")
    assert "BackendDegraded" in reasons(plan)


# -- conditions ----------------------------------------------------------------------------

NO_GATE = {bk.REQUIRE_KV_EVENTS_ANNOTATION: "false"}


@pytest.mark.parametrize(
    ("spec", "dep_status", "ready", "degraded", "progressing"),
    [
        pytest.param(
            {"replicas": 0},
            None,
            ("False", "ScaledToZero"),
            ("False", "NotDegraded"),
            ("False", "ScaledToZero"),
            id="scaled-to-zero",
        ),
        pytest.param(
            {},
            None,
            ("False", "RolloutInProgress"),
            ("False", "NotDegraded"),
            ("True", "RolloutInProgress"),
            id="not-created",
        ),
        pytest.param(
            {},
            {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1},
            ("False", "RolloutInProgress"),
            ("False", "NotDegraded"),
            ("True", "RolloutInProgress"),
            id="old-generation",
        ),
        pytest.param(
            {},
            {"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 0},
            ("False", "ReplicasUnavailable"),
            ("True", "ReplicasUnavailable"),
            ("False", "Degraded"),
            id="unavailable",
        ),
        pytest.param(
            {},
            {"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 1},
            ("True", "BackendReady"),
            ("False", "NotDegraded"),
            ("False", "Synced"),
            id="ready",
        ),
    ],
)
def test_managed_readiness(
    spec: dict[str, Any],
    dep_status: dict[str, Any] | None,
    ready: tuple[str, str],
    degraded: tuple[str, str],
    progressing: tuple[str, str],
) -> None:
    backend = cr(annotations=NO_GATE, **spec)
    observed = bk.Observed()
    if dep_status is not None:
        first = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
        observed = bk.Observed(
            deployment=live(first.objects[0], **dep_status), service=live(first.objects[1])
        )
    plan = bk.desired_backend(backend, observed, SETTINGS, NOW)
    assert conditions(plan) == {"Ready": ready, "Degraded": degraded, "Progressing": progressing}


def test_managed_endpoint_comes_from_the_live_service() -> None:
    backend = cr()
    assert bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW).status["endpoint"] is None
    first = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
    plan = bk.desired_backend(backend, rolled_out(first), SETTINGS, NOW)
    assert plan.status["endpoint"] == "cache.llm.svc.cluster.local:65432"


@pytest.mark.parametrize(
    ("endpoint", "status", "reason", "message"),
    [
        pytest.param(
            "  lm://cache.example:65432 ", "True", "ExternalEndpointAccepted", None, id="accepted-trimmed"
        ),
        pytest.param("[::1]:8200", "True", "ExternalEndpointAccepted", None, id="ipv6"),
        pytest.param("", "False", "ExternalEndpointMissing", "spec.endpoint is empty", id="missing"),
        pytest.param(
            "redis://h:1", "False", "ExternalEndpointInvalid", 'spec.endpoint: scheme "redis"', id="scheme"
        ),
        pytest.param(
            "h:1/path", "False", "ExternalEndpointInvalid", "spec.endpoint: must be host:port", id="path"
        ),
        pytest.param(
            "::1:8200", "False", "ExternalEndpointInvalid", "spec.endpoint: IPv6", id="unbracketed-v6"
        ),
        pytest.param(
            "host", "False", "ExternalEndpointInvalid", "spec.endpoint: host and port", id="no-port"
        ),
    ],
)
def test_external_passthrough(endpoint: str, status: str, reason: str, message: str | None) -> None:
    plan = bk.desired_backend(cr(type="External", endpoint=endpoint), bk.Observed(), SETTINGS, NOW)
    assert plan.objects == ()
    assert conditions(plan) == {"Ready": (status, reason), "Progressing": ("False", reason)}
    assert plan.status["endpoint"] == (endpoint.strip() or None)
    if message:
        assert plan.status["conditions"][0]["message"].startswith(message)


def test_unmanaged_removes_our_conditions_and_endpoint() -> None:
    previous = bk.desired_backend(cr(), bk.Observed(), SETTINGS, NOW).status
    other = {
        "type": "Custom",
        "status": "True",
        "reason": "X",
        "message": "",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }
    backend = cr(
        deploymentKind="StatefulSet", status={**previous, "conditions": [*previous["conditions"], other]}
    )
    plan = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
    assert plan.status["conditions"] == [other]
    assert plan.status["endpoint"] is None


# -- the first-KV-event gate ---------------------------------------------------------------


def participation(
    pods: list[dict[str, Any]], backend: dict[str, Any], event_at: float | None
) -> dict[str, Any]:
    """The indexParticipation the poller derives from a real index's /snapshot."""
    index = store.Index(clock=lambda: NOW.timestamp())
    if event_at is not None:
        index.blocks_stored(
            types.Scope("llm", "m", "vllm"), "10.0.0.7:8000", [b"a", b"b"], [16, 32], event_at
        )
    index.set_stats(
        tenant="llm",
        model="m",
        replica_id="10.0.0.9:8000",
        stats=types.ReplicaStats(1, 0.5, 0.1),
        ts=NOW.timestamp(),
    )
    body = json.loads(snapshot.encode_json(index.snapshot()))
    patches = cp.backend_participation(body, pods, [backend])
    return patches.get(("llm", "cache"), {})


def test_gate_waits_then_opens_on_a_kv_event_from_a_matched_pod() -> None:
    backend = cr()
    first = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
    observed = rolled_out(first)
    # Workload ready, no KV event yet: AwaitingFirstKVEvent, requeue at the timeout.
    plan = bk.desired_backend(backend, observed, SETTINGS, NOW)
    assert conditions(plan)["Ready"] == ("False", "AwaitingFirstKVEvent")
    assert conditions(plan)["Progressing"] == ("True", "AwaitingFirstKVEvent")
    assert plan.status["firstAvailableAt"] == "2026-01-01T12:00:00Z"
    assert plan.requeue_after_s == 30.0  # min(resync, 300 s gate)
    assert reasons(plan) == ["AwaitingFirstKVEvent"]
    backend = with_status(backend, plan)
    # An event from a pod the backend does not match does not open the gate.
    stranger = pod("other", "10.0.0.7", app="sglang")
    backend["status"].update(participation([stranger], backend, NOW.timestamp()))
    later = NOW + dt.timedelta(seconds=10)
    plan = bk.desired_backend(backend, observed, SETTINGS, later)
    assert conditions(plan)["Ready"] == ("False", "AwaitingFirstKVEvent")
    assert plan.events == ()  # no transition, no event
    # The matched pod's event reaches the index: the poller writes it, the gate opens.
    backend["status"].update(participation([pod("vllm-0", "10.0.0.7")], backend, later.timestamp()))
    assert backend["status"]["indexParticipation"] == {
        "prefixCount": 2,
        "lastEventAt": "2026-01-01T12:00:10Z",
    }
    plan = bk.desired_backend(backend, observed, SETTINGS, later)
    assert conditions(plan) == {
        "Ready": ("True", "KVEventsObserved"),
        "Degraded": ("False", "NotDegraded"),
        "Progressing": ("False", "Synced"),
    }
    assert plan.status["firstKVEventObservedAt"] == "2026-01-01T12:00:10Z"
    assert reasons(plan) == ["KVEventsObserved"]
    backend = with_status(backend, plan)
    # Latched: losing the participation later keeps Ready, and no event repeats.
    backend["status"]["indexParticipation"] = {"prefixCount": 0}
    plan = bk.desired_backend(backend, observed, SETTINGS, later + dt.timedelta(hours=1))
    assert conditions(plan)["Ready"] == ("True", "KVEventsObserved")
    assert plan.events == ()


def test_gate_times_out_sticky_and_recovers() -> None:
    backend = cr(integration={"firstEventTimeout": "1m"})
    observed = rolled_out(bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW))
    backend = with_status(backend, bk.desired_backend(backend, observed, SETTINGS, NOW))
    plan = bk.desired_backend(backend, observed, SETTINGS, NOW + dt.timedelta(seconds=45))
    assert plan.requeue_after_s == 15.0
    plan = bk.desired_backend(backend, observed, SETTINGS, NOW + dt.timedelta(seconds=60))
    assert conditions(plan)["Ready"] == ("False", "NoKVEventsObserved")
    assert conditions(plan)["Degraded"] == ("True", "NoKVEventsObserved")
    assert reasons(plan) == ["NoKVEventsObserved"]  # no BackendDegraded for this reason
    backend = with_status(backend, plan)
    # Sticky: a timeout change does not bring AwaitingFirstKVEvent back.
    backend["spec"]["integration"]["firstEventTimeout"] = "1h"
    plan = bk.desired_backend(backend, observed, SETTINGS, NOW + dt.timedelta(seconds=61))
    assert conditions(plan)["Ready"] == ("False", "NoKVEventsObserved")
    assert plan.events == ()
    backend["status"]["indexParticipation"] = {"prefixCount": 1, "lastEventAt": "2026-01-01T12:05:00Z"}
    plan = bk.desired_backend(backend, observed, SETTINGS, NOW + dt.timedelta(minutes=6))
    assert conditions(plan)["Ready"] == ("True", "KVEventsObserved")
    assert reasons(plan) == ["KVEventsObserved"]  # no BackendRecovered from NoKVEventsObserved


def test_degraded_and_recovered_events() -> None:
    backend = cr(annotations=NO_GATE)
    first = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
    ok = rolled_out(first)
    broken = rolled_out(first, available=0)
    backend = with_status(backend, bk.desired_backend(backend, ok, SETTINGS, NOW))
    plan = bk.desired_backend(backend, broken, SETTINGS, NOW)
    assert reasons(plan) == ["BackendDegraded"]
    assert plan.events[0].type == "Warning"
    assert plan.events[0].message == "cache backend is degraded: 0/1 replicas available"
    backend = with_status(backend, plan)
    assert bk.desired_backend(backend, broken, SETTINGS, NOW).events == ()
    plan = bk.desired_backend(backend, ok, SETTINGS, NOW)
    assert reasons(plan) == ["BackendRecovered"]


def test_last_transition_time_kept_while_status_unchanged() -> None:
    backend = cr(annotations=NO_GATE)
    first = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW)
    backend = with_status(backend, first)
    plan = bk.desired_backend(backend, bk.Observed(), SETTINGS, NOW + dt.timedelta(minutes=1))
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert ready["observedGeneration"] == 3
    plan = bk.desired_backend(backend, rolled_out(first), SETTINGS, NOW + dt.timedelta(minutes=1))
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-01T12:01:00Z"


@pytest.mark.parametrize(
    ("pods", "annotations", "status", "ready"),
    [
        pytest.param([], None, {}, ("False", "NoEnginePods"), id="no-pods"),
        pytest.param(
            [pod("a", "10.0.0.7", ready=False)], None, {}, ("False", "NoEnginePods"), id="pod-not-ready"
        ),
        pytest.param([pod("a", "10.0.0.7")], None, {}, ("False", "AwaitingFirstKVEvent"), id="awaiting"),
        pytest.param([pod("a", "10.0.0.7")], NO_GATE, {}, ("True", "EnginesReady"), id="gate-disabled"),
        pytest.param(
            [pod("a", "10.0.0.7")],
            None,
            {"indexParticipation": {"prefixCount": 3, "lastEventAt": "2026-01-01T11:59:00Z"}},
            ("True", "KVEventsObserved"),
            id="events-seen",
        ),
    ],
)
def test_type_none_is_ready_from_the_gate_alone(
    pods: list[dict[str, Any]],
    annotations: dict[str, str] | None,
    status: dict[str, Any],
    ready: tuple[str, str],
) -> None:
    plan = bk.desired_backend(
        cr(type="None", annotations=annotations, status=status), bk.Observed(pods=tuple(pods)), SETTINGS, NOW
    )
    assert plan.objects == ()
    assert conditions(plan)["Ready"] == ready
    assert plan.status["endpoint"] is None


# -- matchedEnginePods and fail-open events ---------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "previous", "matched", "requeue"),
    [
        pytest.param({"app": "vllm"}, None, 2, 30.0, id="counts-matching-pods-in-namespace"),
        pytest.param({"app": "vllm", "tier": "x"}, None, 0, 30.0, id="subset-required"),
        pytest.param({}, None, None, None, id="empty-selector-claims-nothing"),
        pytest.param({}, 4, None, 30.0, id="cleared-then-one-more-resync"),
    ],
)
def test_matched_engine_pods(
    selector: dict[str, str], previous: int | None, matched: int | None, requeue: float | None
) -> None:
    backend = cr(
        type="External", endpoint="h:1", status={"matchedEnginePods": previous} if previous else None
    )
    backend["spec"]["engineSelector"] = {"matchLabels": selector}
    pods = (
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.2", ready=False),
        pod("c", "10.0.0.3", app="other"),
        pod("d", "10.0.0.4", namespace="elsewhere"),
    )
    plan = bk.desired_backend(backend, bk.Observed(pods=pods), SETTINGS, NOW)
    assert plan.status["matchedEnginePods"] == matched
    assert plan.requeue_after_s == requeue


@pytest.mark.parametrize(
    ("before", "fail_open", "events"),
    [
        pytest.param(None, None, [], id="default-silent"),
        pytest.param(None, False, ["FailClosedEnabled"], id="first-apply-fail-closed"),
        pytest.param(True, False, ["FailClosedEnabled"], id="closed"),
        pytest.param(False, False, [], id="still-closed"),
        pytest.param(False, True, ["FailOpenRestored"], id="restored"),
    ],
)
def test_fail_open_events(before: bool | None, fail_open: bool | None, events: list[str]) -> None:
    integration = {} if fail_open is None else {"failOpen": fail_open}
    status = None if before is None else {"failOpen": before}
    plan = bk.desired_backend(
        cr(type="External", endpoint="h:1", integration=integration, status=status),
        bk.Observed(),
        SETTINGS,
        NOW,
    )
    assert reasons(plan) == events
    assert plan.status["failOpen"] is (fail_open is not False)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3), ("-2s", -2.0), ("0", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert bk.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        bk.parse_duration(text)


# -- engine pods created without the webhook's injection ---------------------------------------


def annotated(p: dict[str, Any], **annotations: str) -> dict[str, Any]:
    """``p`` with exactly these annotations (none: created while no webhook answered)."""
    p["metadata"]["annotations"] = annotations
    return p


def bare(name: str, ip: str, **kw: Any) -> dict[str, Any]:
    return annotated(pod(name, ip, **kw))


INJECTED = {bk.INJECTED_BY_ANNOTATION: "llm/cache"}


@pytest.mark.parametrize(
    ("pods", "names"),
    [
        pytest.param([annotated(pod("a", "10.0.0.1"), **INJECTED)], [], id="injected"),
        pytest.param([bare("b", "10.0.0.2"), bare("a", "10.0.0.1")], ["a", "b"], id="not-injected-sorted"),
        pytest.param(
            [annotated(pod("a", "10.0.0.1"), **{bk.SKIP_INJECT_ANNOTATION: "true"})], [], id="opted-out"
        ),
        pytest.param(
            [annotated(pod("a", "10.0.0.1"), **{bk.SKIP_INJECT_ANNOTATION: "false"})], ["a"], id="falsey-skip"
        ),
        pytest.param([bare("a", "10.0.0.1", app="other")], [], id="not-selected"),
        pytest.param([bare("a", "10.0.0.1", namespace="elsewhere")], [], id="other-namespace"),
        pytest.param([bare("a", "10.0.0.1", ready=False)], ["a"], id="not-ready-counts"),
    ],
)
def test_uninjected_engine_pods(pods: list[dict[str, Any]], names: list[str]) -> None:
    assert bk.uninjected_engine_pods(cr(), pods) == names


def test_a_pod_being_deleted_is_not_reported() -> None:
    p = bare("a", "10.0.0.1")
    p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert bk.uninjected_engine_pods(cr(), [p]) == []


def _uninjected_plan(previous: list[str] | None, pods: list[dict[str, Any]]) -> bk.BackendPlan:
    status = {"uninjectedEnginePods": previous} if previous else None
    backend = cr(type="External", endpoint="h:1", status=status)
    return bk.desired_backend(backend, bk.Observed(pods=tuple(pods)), SETTINGS, NOW)


@pytest.mark.parametrize(
    ("previous", "pods", "listed", "warned"),
    [
        pytest.param(None, [bare("a", "10.0.0.1")], ["a"], True, id="appears"),
        pytest.param(["a"], [bare("a", "10.0.0.1")], ["a"], False, id="unchanged-no-event"),
        pytest.param(["a"], [bare("a", "10.0.0.1"), bare("b", "10.0.0.2")], ["a", "b"], True, id="grows"),
        pytest.param(
            ["a"], [annotated(pod("a", "10.0.0.1"), **INJECTED)], None, False, id="restarted-cleared"
        ),
        pytest.param(None, [], None, False, id="none"),
    ],
)
def test_uninjected_status_and_transition_only_warning(
    previous: list[str] | None, pods: list[dict[str, Any]], listed: list[str] | None, warned: bool
) -> None:
    plan = _uninjected_plan(previous, pods)
    assert plan.status["uninjectedEnginePods"] == listed
    warnings = [e for e in plan.events if e.reason == "EnginePodsNotInjected"]
    assert len(warnings) == int(warned)
    if warned:
        assert warnings[0].type == "Warning"
        assert all(name in warnings[0].message for name in listed or [])


def test_uninjected_list_is_capped_and_the_event_counts_the_rest() -> None:
    pods = [bare(f"p{i:02}", f"10.0.0.{i}") for i in range(bk.UNINJECTED_LIST_MAX + 3)]
    plan = _uninjected_plan(None, pods)
    assert len(plan.status["uninjectedEnginePods"]) == bk.UNINJECTED_LIST_MAX
    (warning,) = [e for e in plan.events if e.reason == "EnginePodsNotInjected"]
    assert "and 3 more" in warning.message
