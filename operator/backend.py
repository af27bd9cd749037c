"""CacheBackend reconcile logic: desired children, status conditions and events (seed §6.2).

Owner: ``inference_cache.operator`` (the CacheBackend kopf handler calls
:func:`desired_backend`). Data flow: the handler reads the CacheBackend, the live
Deployment/Service/HPA named like it and the pods of its namespace into an
:class:`Observed`, calls :func:`desired_backend` with the current time, then applies
``plan.objects`` in order (stopping at the first failure: never expose or scale a workload
whose Deployment apply failed), deletes ``plan.deletes``, merge-patches ``plan.status`` into
``status`` (adding ``observedGeneration`` only when every apply succeeded), posts
``plan.events`` and requeues after ``plan.requeue_after_s``. No I/O happens here.

``spec.type``:

* ``LMCache`` (the CRD default; "managed"): an LMCache ``lmcache_server`` Deployment +
  ClusterIP Service (+ ``autoscaling/v2`` HPA when ``spec.autoscaling`` is set); Ready from
  the rollout, then the first-KV-event gate.
* ``External``: no children, ``status.endpoint`` = the trimmed ``spec.endpoint``; Ready when
  it is set and well formed (no reachability probing).
* ``None``: no cache server, KV events and routing only; Ready from the KV-event gate alone
  (anchored at the first time a matched engine pod was Ready).
* anything else, ``deploymentKind: StatefulSet`` or an unsupported engine: unmanaged (no
  children, endpoint cleared, the three conditions removed).

Children we no longer want are deleted only when they carry our managed-by label AND a
controller owner reference to this CacheBackend's uid (unmanaged shedding never touches
foreign objects). The KV-event gate reads ``status.indexParticipation.lastEventAt``, which
the CacheIndex poller (``operator.controlplane.backend_participation``) writes from the
server's ``/snapshot`` rows attributed to this backend's matched pods.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from inference_cache import durations

Obj = dict[str, Any]

GROUP: Final = "inferencecache.io"
API_VERSION: Final = f"{GROUP}/v1alpha1"
KIND: Final = "CacheBackend"
#: Label value marking the objects this operator created (checked before any delete).
MANAGED_BY: Final = "inference-cache-controller"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
NAME_LABEL: Final = "app.kubernetes.io/name"
INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
BACKEND_TYPE_LABEL: Final = f"{GROUP}/backend-type"
#: ``"false"`` (exactly) on the CacheBackend disables the first-KV-event gate.
REQUIRE_KV_EVENTS_ANNOTATION: Final = f"{GROUP}/require-kv-events"
#: Set by the pod webhook on every pod it injects (``ns/name`` of the CacheBackend).
INJECTED_BY_ANNOTATION: Final = f"{GROUP}/injected-by"
#: A pod carrying it (any value but a falsey one) opts out of the injection.
SKIP_INJECT_ANNOTATION: Final = f"{GROUP}/skip-inject"
_FALSEY: Final = frozenset({"0", "f", "false", "no", "off", "disable", "disabled"})
#: At most this many names in ``status.uninjectedEnginePods`` and its Event.
UNINJECTED_LIST_MAX: Final = 20

TYPE_LMCACHE: Final = "LMCache"
TYPE_EXTERNAL: Final = "External"
TYPE_NONE: Final = "None"
#: (engine, type) pairs with a runtime adapter; others are unmanaged.
SUPPORTED_PAIRS: Final = frozenset(
    {("vllm", TYPE_LMCACHE), ("vllm", TYPE_EXTERNAL), ("vllm", TYPE_NONE), ("sglang", TYPE_NONE)}
)

SERVER_CONTAINER: Final = "lmcache-server"
SERVER_PORT_NAME: Final = "lmcache"
CONDITION_TYPES: Final = ("Ready", "Degraded", "Progressing")


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Operator-wide knobs of the CacheBackend reconciler."""

    #: LMCache server image when ``backendConfig.serverImage`` is unset. The original used
    #: ``lmcache/standalone:latest``; the maintained image carrying ``lmcache_server`` is
    #: ``lmcache/vllm-openai`` (protocols.md §7.3).
    server_image: str = "lmcache/vllm-openai:latest"
    #: ``lmcache_server <host> <port> [device]`` (overridden by ``backendConfig.serverCommand``).
    server_command: tuple[str, ...] = ("/opt/venv/bin/lmcache_server",)
    server_args: tuple[str, ...] = ("0.0.0.0", "65432", "cpu")
    #: Container port and Service port of the LMCache server.
    server_port: int = 65432
    cluster_domain: str = "cluster.local"
    #: Self-requeue while a selector exists (matchedEnginePods refresh), seconds.
    resync_s: float = 30.0
    #: ``integration.firstEventTimeout`` when unset or <= 0, seconds.
    first_event_timeout_s: float = 300.0
    #: HPA CPU target when ``autoscaling.targetCPUUtilizationPercent`` is unset.
    target_cpu_percent: int = 80


@dataclass(frozen=True, slots=True)
class Observed:
    """What the handler read from the API for one CacheBackend (live objects or ``None``)."""

    deployment: Obj | None = None
    service: Obj | None = None
    hpa: Obj | None = None
    #: Pods of the CacheBackend's namespace (all of them; matching happens here).
    pods: tuple[Obj, ...] = ()


@dataclass(frozen=True, slots=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Event:
    """A Kubernetes Event to post on the CacheBackend."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class BackendPlan:
    #: Objects to create-or-update, in apply order (Deployment, Service, HPA).
    objects: tuple[Obj, ...] = ()
    #: Owned children to delete.
    deletes: tuple[ObjectRef, ...] = ()
    #: A JSON merge patch for ``status`` (``None`` values delete keys; ``conditions`` is whole).
    status: Obj = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    #: Reconcile again after this many seconds (``None``: only on changes).
    requeue_after_s: float | None = None


# -- small helpers shared with controlplane ---------------------------------------------


def parse_duration(text: str) -> float:
    """A Go ``time.Duration`` string in seconds (``durations.parse``)."""
    return durations.parse(text)


def format_time(t: dt.datetime) -> str:
    """``metav1.Time`` (RFC 3339, second precision, UTC)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    """An RFC 3339 time; ``None``, empty and Go's zero time are ``None``."""
    if not text or text.startswith("0001-01-01"):
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def match_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    """``spec.engineSelector.matchLabels`` (empty = claims nothing)."""
    sel = (obj.get("spec") or {}).get("engineSelector") or {}
    return dict(sel.get("matchLabels") or {})


def selects(selector: Mapping[str, str], pod: Mapping[str, Any]) -> bool:
    """Equality selector; an empty selector selects nothing."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's ``Ready`` condition is ``True`` and it is not being deleted."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def condition(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def make_condition(
    previous: Iterable[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: dt.datetime,
    generation: int,
) -> Obj:
    """A ``metav1.Condition``; ``lastTransitionTime`` is kept while the status is unchanged."""
    text = "True" if status else "False"
    old = condition(previous, type_)
    since = old["lastTransitionTime"] if old and old.get("status") == text else format_time(now)
    return {
        "type": type_,
        "status": text,
        "observedGeneration": generation,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message,
    }


def owned_by(obj: Mapping[str, Any] | None, owner_uid: str) -> bool:
    """Our managed-by label and a controller owner reference to ``owner_uid``."""
    if obj is None:
        return False
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
        return False
    return any(
        ref.get("uid") == owner_uid and ref.get("controller") is True
        for ref in meta.get("ownerReferences") or []
    )


# -- endpoint shape (seed §6.5 ValidateLMCacheEndpoint) ----------------------------------


def endpoint_shape_error(endpoint: str) -> str | None:
    """Why an External LMCache endpoint (``[lm://]host:port``) is malformed, or ``None``
    (the original's ``ValidateLMCacheEndpoint``; used by the reconciler's condition and the
    admission webhook alike)."""
    s = endpoint.strip()
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        return "must not contain whitespace or control characters"
    scheme, sep, rest = s.partition("://")
    if sep:
        if scheme.lower() != "lm":
            return f'scheme "{scheme}" is not supported; use lm:// or host:port'
    else:
        rest = s
    if any(c in rest for c in "/?#"):
        return "must be host:port with no path, query or fragment"
    if rest.startswith("["):
        host, bracket, port = rest[1:].partition("]")
        if not bracket or not port.startswith(":") or ":" in port[1:]:
            return "a bracketed IPv6 host must be followed by :port only"
        port = port[1:]
    else:
        if rest.count(":") > 1:
            return "IPv6 hosts must be bracketed, e.g. [::1]:65432"
        host, _, port = rest.partition(":")
    if not host or not port:
        return "host and port are both required"
    return None


# -- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ready:
    status: bool
    reason: str
    message: str


def _child_refs(namespace: str, name: str) -> tuple[ObjectRef, ...]:
    return (
        ObjectRef("apps/v1", "Deployment", namespace, name),
        ObjectRef("v1", "Service", namespace, name),
        ObjectRef("autoscaling/v2", "HorizontalPodAutoscaler", namespace, name),
    )


def _live(observed: Observed, kind: str) -> Obj | None:
    return {"Deployment": observed.deployment, "Service": observed.service}.get(kind, observed.hpa)


def _shed(backend: Mapping[str, Any], observed: Observed, keep: frozenset[str]) -> tuple[ObjectRef, ...]:
    meta = backend["metadata"]
    return tuple(
        ref
        for ref in _child_refs(meta["namespace"], meta["name"])
        if ref.kind not in keep and owned_by(_live(observed, ref.kind), meta.get("uid", ""))
    )


def selector_labels(name: str) -> dict[str, str]:
    """The labels every object a CacheBackend owns carries (and its pods' selector)."""
    return {NAME_LABEL: "cachebackend", INSTANCE_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}


def owned_metadata(backend: Mapping[str, Any], labels: Mapping[str, str]) -> Obj:
    """``metadata`` of an object ``backend`` owns: its name and namespace, ``labels``, and
    a controller ownerReference to it."""
    meta = backend["metadata"]
    return {
        "name": meta["name"],
        "namespace": meta["namespace"],
        "labels": dict(labels),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "uid": meta.get("uid", ""),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


_TEMPLATE_FIELDS: Final = (
    "nodeSelector",
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "imagePullSecrets",
    "serviceAccountName",
    "securityContext",
    "priorityClassName",
    "schedulerName",
    "runtimeClassName",
    "terminationGracePeriodSeconds",
)


def _server_container(spec: Mapping[str, Any], settings: BackendSettings) -> Obj:
    config = spec.get("backendConfig") or {}
    custom = (config.get("serverCommand") or "").split()
    command, args = (
        (custom[:1], custom[1:]) if custom else (list(settings.server_command), list(settings.server_args))
    )
    container: Obj = {
        "name": SERVER_CONTAINER,
        "image": config.get("serverImage") or settings.server_image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "ports": [{"name": SERVER_PORT_NAME, "containerPort": settings.server_port, "protocol": "TCP"}],
        "readinessProbe": {
            "tcpSocket": {"port": SERVER_PORT_NAME},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    if spec.get("autoscaling"):
        # An HPA on CPU utilisation needs a CPU request to compute a percentage.
        container["resources"] = {"requests": {"cpu": "250m", "memory": "1Gi"}}
    return container


def _replicas(spec: Mapping[str, Any], live: Obj | None) -> int:
    autoscaling = spec.get("autoscaling")
    if not autoscaling:
        return int(spec.get("replicas", 1))
    floor = int(autoscaling.get("minReplicas") or 1)
    if live is None:
        return floor
    # The HPA owns the count; only clamp it up to the floor.
    return max(int((live.get("spec") or {}).get("replicas", floor)), floor)


def _deployment(backend: Mapping[str, Any], observed: Observed, settings: BackendSettings) -> Obj:
    spec = backend.get("spec") or {}
    name = backend["metadata"]["name"]
    selector = selector_labels(name)
    labels = {**selector, BACKEND_TYPE_LABEL: spec.get("type") or TYPE_LMCACHE}
    pod_spec: Obj = {
        "schedulerName": "default-scheduler",
        "terminationGracePeriodSeconds": 30,
        "containers": [_server_container(spec, settings)],
    }
    template = spec.get("template") or {}
    pod_spec.update({k: template[k] for k in _TEMPLATE_FIELDS if k in template})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owned_metadata(backend, labels),
        "spec": {
            "replicas": _replicas(spec, observed.deployment),
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _service(backend: Mapping[str, Any], settings: BackendSettings) -> Obj:
    name = backend["metadata"]["name"]
    spec = backend.get("spec") or {}
    labels = {**selector_labels(name), BACKEND_TYPE_LABEL: spec.get("type") or TYPE_LMCACHE}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(backend, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": SERVER_PORT_NAME,
                    "port": settings.server_port,
                    "targetPort": SERVER_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _hpa(backend: Mapping[str, Any], settings: BackendSettings) -> Obj:
    name = backend["metadata"]["name"]
    spec = backend.get("spec") or {}
    autoscaling = spec["autoscaling"]
    labels = {**selector_labels(name), BACKEND_TYPE_LABEL: spec.get("type") or TYPE_LMCACHE}
    target = autoscaling.get("targetCPUUtilizationPercent") or settings.target_cpu_percent
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": owned_metadata(backend, labels),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": int(autoscaling.get("minReplicas") or 1),
            "maxReplicas": int(autoscaling["maxReplicas"]),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": target},
                    },
                }
            ],
        },
    }


def _workload_ready(backend: Mapping[str, Any], live: Obj | None) -> _Ready:
    """``managedReadiness`` of the original, from the live Deployment."""
    spec = backend.get("spec") or {}
    dep_spec = (live or {}).get("spec") or {}
    want = int(dep_spec.get("replicas", 1)) if spec.get("autoscaling") else int(spec.get("replicas", 1))
    if want == 0:
        return _Ready(False, "ScaledToZero", "spec.replicas is 0; the cache server is scaled to zero")
    if live is None:
        return _Ready(False, "RolloutInProgress", f"deployment not created yet (0/{want} replicas available)")
    st = live.get("status") or {}
    meta = live.get("metadata") or {}
    rolled_out = int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 0))
    updated = int(st.get("updatedReplicas", 0))
    available = int(st.get("availableReplicas", 0))
    if rolled_out and updated >= want and available >= want:
        return _Ready(True, "BackendReady", f"{available}/{want} replicas available")
    if not rolled_out or updated < want:
        return _Ready(False, "RolloutInProgress", f"rollout in progress ({updated}/{want} replicas updated)")
    return _Ready(False, "ReplicasUnavailable", f"{available}/{want} replicas available")


@dataclass(frozen=True, slots=True)
class _Gate:
    ready: _Ready
    degraded: bool
    requeue_after_s: float | None
    first_available_at: str | None
    first_event_at: str | None


def _first_event_timeout_s(spec: Mapping[str, Any], settings: BackendSettings) -> float:
    text = (spec.get("integration") or {}).get("firstEventTimeout")
    try:
        timeout = parse_duration(text) if text else 0.0
    except ValueError:
        timeout = 0.0
    return timeout if timeout > 0 else settings.first_event_timeout_s


def _kv_gate(
    backend: Mapping[str, Any], workload: _Ready, now: dt.datetime, settings: BackendSettings
) -> _Gate:
    """The first-KV-event gate (applies only once the workload is Ready)."""
    status = backend.get("status") or {}
    first_available = status.get("firstAvailableAt")
    first_event = status.get("firstKVEventObservedAt")
    enabled = (backend["metadata"].get("annotations") or {}).get(REQUIRE_KV_EVENTS_ANNOTATION) != "false"
    if not workload.status:
        return _Gate(workload, workload.reason == "ReplicasUnavailable", None, first_available, first_event)
    first_available = first_available or format_time(now)
    last_event = (status.get("indexParticipation") or {}).get("lastEventAt")
    if parse_time(last_event) is not None and not first_event:
        first_event = last_event
    if not enabled:
        return _Gate(workload, False, None, first_available, first_event)
    if first_event:
        ready = _Ready(True, "KVEventsObserved", "the index has seen KV events from the matched engine pods")
        return _Gate(ready, False, None, first_available, first_event)
    timeout = _first_event_timeout_s(backend.get("spec") or {}, settings)
    previous = condition(status.get("conditions") or [], "Ready")
    anchor = parse_time(first_available) or now
    elapsed = (now - anchor).total_seconds()
    if (previous or {}).get("reason") == "NoKVEventsObserved" or elapsed >= timeout:
        ready = _Ready(
            False,
            "NoKVEventsObserved",
            f"no KV event from a matched engine pod reached the index within {timeout:g}s",
        )
        return _Gate(ready, True, None, first_available, first_event)
    ready = _Ready(False, "AwaitingFirstKVEvent", "waiting for the first KV event from a matched engine pod")
    return _Gate(ready, False, timeout - elapsed, first_available, first_event)


def _conditions(
    backend: Mapping[str, Any], gate: _Gate, now: dt.datetime
) -> tuple[list[Obj], tuple[Event, ...]]:
    previous = (backend.get("status") or {}).get("conditions") or []
    generation = int(backend["metadata"].get("generation", 0))
    ready = gate.ready
    if ready.status:
        progressing = (False, "Synced", "rendered children match desired state")
    elif ready.reason in ("RolloutInProgress", "AwaitingFirstKVEvent"):
        progressing = (True, ready.reason, ready.message)
    elif ready.reason == "ReplicasUnavailable":
        progressing = (False, "Degraded", ready.message)
    else:
        progressing = (False, ready.reason, ready.message)
    degraded = (
        (True, ready.reason, ready.message)
        if gate.degraded
        else (False, "NotDegraded", "cache backend is healthy")
    )
    made = [
        make_condition(
            previous, "Ready", ready.status, ready.reason, ready.message, now=now, generation=generation
        ),
        make_condition(previous, "Degraded", *degraded, now=now, generation=generation),
        make_condition(previous, "Progressing", *progressing, now=now, generation=generation),
    ]
    return made, _condition_events(previous, made)


def _condition_events(
    previous: Sequence[Mapping[str, Any]], made: Sequence[Mapping[str, Any]]
) -> tuple[Event, ...]:
    old_ready = condition(previous, "Ready") or {}
    old_degraded = condition(previous, "Degraded") or {}
    ready = condition(made, "Ready") or {}
    degraded = condition(made, "Degraded") or {}
    events: list[Event] = []
    was_degraded = old_degraded.get("status") == "True"
    if (
        degraded.get("status") == "True"
        and not was_degraded
        and degraded.get("reason") != "NoKVEventsObserved"
    ):
        events.append(
            Event("Warning", "BackendDegraded", f"cache backend is degraded: {ready.get('message')}")
        )
    if was_degraded and ready.get("status") == "True" and old_degraded.get("reason") != "NoKVEventsObserved":
        events.append(Event("Normal", "BackendRecovered", f"cache backend recovered: {ready.get('message')}"))
    if ready.get("reason") != old_ready.get("reason"):
        if ready.get("reason") == "AwaitingFirstKVEvent":
            events.append(Event("Normal", "AwaitingFirstKVEvent", str(ready.get("message"))))
        elif ready.get("reason") == "NoKVEventsObserved":
            events.append(Event("Warning", "NoKVEventsObserved", str(ready.get("message"))))
    return tuple(events)


def _fail_open(spec: Mapping[str, Any]) -> bool:
    value = (spec.get("integration") or {}).get("failOpen")
    return value is not False


def _fail_open_events(backend: Mapping[str, Any]) -> tuple[Event, ...]:
    before = (backend.get("status") or {}).get("failOpen", True) is not False
    after = _fail_open(backend.get("spec") or {})
    if before and not after:
        return (
            Event(
                "Warning",
                "FailClosedEnabled",
                "integration.failOpen is false: engine pods fail closed when the cache is unreachable",
            ),
        )
    if after and not before:
        return (Event("Normal", "FailOpenRestored", "integration.failOpen is true again"),)
    return ()


def matched_engine_pods(backend: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> int | None:
    """Pods of the namespace matching ``engineSelector`` (``None`` without a selector)."""
    selector = match_labels(backend)
    if not selector:
        return None
    namespace = backend["metadata"]["namespace"]
    return sum(1 for p in pods if p["metadata"].get("namespace") == namespace and selects(selector, p))


def opted_out(value: object) -> bool:
    """A ``skip-inject`` annotation value that opts out (present, not empty, not falsey)."""
    if value is None or value == "":
        return False
    return str(value).strip().lower() not in _FALSEY


def uninjected_engine_pods(backend: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names (sorted) of the namespace's pods matching ``engineSelector`` that carry neither
    our ``injected-by`` annotation nor an opt-out: created while no pod webhook answered (it
    fails open: operator down, a failover). Pods cannot be mutated after creation; they get
    the injection when restarted. Pods being deleted are left out."""
    selector = match_labels(backend)
    namespace = backend["metadata"]["namespace"]
    names = []
    for p in pods:
        meta = p.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        if (
            meta.get("namespace") == namespace
            and not meta.get("deletionTimestamp")
            and selects(selector, p)
            and INJECTED_BY_ANNOTATION not in annotations
            and not opted_out(annotations.get(SKIP_INJECT_ANNOTATION))
        ):
            names.append(str(meta.get("name", "")))
    return sorted(names)


def _uninjected_events(old: object, now: Sequence[str], total: int) -> tuple[Event, ...]:
    """Transition-only: a Warning when the listed pods change to a non-empty set."""
    if not now or list(now) == (old if isinstance(old, list) else []):
        return ()
    more = f" (and {total - len(now)} more)" if total > len(now) else ""
    return (
        Event(
            "Warning",
            "EnginePodsNotInjected",
            f"{total} engine pod(s) were created without the inference-cache injection (no pod "
            f"webhook answered); restart them to inject: {', '.join(now)}{more}",
        ),
    )


def _resolve(spec: Mapping[str, Any]) -> tuple[str, str]:
    engine = ((spec.get("integration") or {}).get("engine") or "vllm").lower()
    return engine, spec.get("type") or TYPE_LMCACHE


def desired_backend(
    backend: Mapping[str, Any],
    observed: Observed,
    settings: BackendSettings,
    now: dt.datetime,
) -> BackendPlan:
    """The whole reconcile decision for one CacheBackend (see the module docstring)."""
    spec = backend.get("spec") or {}
    meta = backend["metadata"]
    engine, type_ = _resolve(spec)
    matched = matched_engine_pods(backend, observed.pods)
    old_status = backend.get("status") or {}
    status: Obj = {"failOpen": _fail_open(spec), "matchedEnginePods": matched}
    events = list(_fail_open_events(backend))
    uninjected = uninjected_engine_pods(backend, observed.pods)
    listed = uninjected[:UNINJECTED_LIST_MAX]
    status["uninjectedEnginePods"] = listed or None
    events += _uninjected_events(old_status.get("uninjectedEnginePods"), listed, len(uninjected))
    resync = (
        settings.resync_s if matched is not None or old_status.get("matchedEnginePods") is not None else None
    )
    others = [c for c in old_status.get("conditions") or [] if c.get("type") not in CONDITION_TYPES]

    if type_ == TYPE_EXTERNAL and (engine, type_) in SUPPORTED_PAIRS:
        endpoint = (spec.get("endpoint") or "").strip()
        error = endpoint_shape_error(endpoint) if endpoint else None
        if not endpoint:
            ready = _Ready(
                False, "ExternalEndpointMissing", "spec.endpoint is empty; set it to host:port of the cache"
            )
        elif error:
            ready = _Ready(False, "ExternalEndpointInvalid", "spec.endpoint: " + error)
        else:
            ready = _Ready(True, "ExternalEndpointAccepted", f"external cache endpoint {endpoint}")
        previous = old_status.get("conditions") or []
        generation = int(meta.get("generation", 0))
        status["endpoint"] = endpoint or None
        status["conditions"] = [
            *others,
            make_condition(
                previous, "Ready", ready.status, ready.reason, ready.message, now=now, generation=generation
            ),
            make_condition(
                previous, "Progressing", False, ready.reason, ready.message, now=now, generation=generation
            ),
        ]
        return BackendPlan((), _shed(backend, observed, frozenset()), status, tuple(events), resync)

    unmanaged = (engine, type_) not in SUPPORTED_PAIRS or spec.get("deploymentKind") == "StatefulSet"
    if unmanaged:
        status["endpoint"] = None
        status["conditions"] = others
        return BackendPlan((), _shed(backend, observed, frozenset()), status, tuple(events), resync)

    if type_ == TYPE_NONE:
        ready_pods = sum(
            1
            for p in observed.pods
            if p["metadata"].get("namespace") == meta["namespace"]
            and selects(match_labels(backend), p)
            and pod_ready(p)
        )
        workload = (
            _Ready(True, "EnginesReady", f"{ready_pods} matched engine pods Ready")
            if ready_pods
            else _Ready(False, "NoEnginePods", "no Ready pod matches spec.engineSelector")
        )
        objects: tuple[Obj, ...] = ()
        deletes = _shed(backend, observed, frozenset())
        status["endpoint"] = None
    else:
        uid = meta.get("uid", "")
        foreign = next(
            (
                o
                for o in (observed.deployment, observed.service, observed.hpa)
                if o is not None and not owned_by(o, uid)
            ),
            None,
        )
        if foreign is not None:
            # Never adopt, scale or expose an object someone else owns.
            where = f"{meta['namespace']}/{meta['name']}"
            msg = f"{foreign['kind']} {where} exists and is not owned by this CacheBackend"
            gate = _Gate(_Ready(False, "OwnershipConflict", msg), True, None, None, None)
            conditions, cond_events = _conditions(backend, gate, now)
            status["conditions"] = [*others, *conditions]
            return BackendPlan((), (), status, (*events, *cond_events), resync)
        objs = [_deployment(backend, observed, settings), _service(backend, settings)]
        keep = {"Deployment", "Service"}
        if spec.get("autoscaling"):
            objs.append(_hpa(backend, settings))
            keep.add("HorizontalPodAutoscaler")
        objects = tuple(objs)
        deletes = _shed(backend, observed, frozenset(keep))
        workload = _workload_ready(backend, observed.deployment)
        svc_ports = ((observed.service or {}).get("spec") or {}).get("ports") or []
        status["endpoint"] = (
            f"{meta['name']}.{meta['namespace']}.svc.{settings.cluster_domain}:{svc_ports[0]['port']}"
            if observed.service is not None and svc_ports
            else None
        )

    gate = _kv_gate(backend, workload, now, settings)
    conditions, cond_events = _conditions(backend, gate, now)
    status["conditions"] = [*others, *conditions]
    status["firstAvailableAt"] = gate.first_available_at
    status["firstKVEventObservedAt"] = gate.first_event_at
    if gate.first_event_at and not old_status.get("firstKVEventObservedAt"):
        cond_events += (
            Event("Normal", "KVEventsObserved", f"first KV event observed at {gate.first_event_at}"),
        )
    requeue = min((t for t in (resync, gate.requeue_after_s) if t is not None), default=None)
    return BackendPlan(objects, deletes, status, (*events, *cond_events), requeue)
