"""CacheBackend kopf handlers: read what is live, ask the pure functions, write the answer.

Owner: ``inference-cache operator`` (issue #7). Place in the flow::

    kopf (create/update/resume, timer) ──► reconcile()
        Kube.get/list ──► Observed ──► backend.desired_backend(...)       ─┐
        Kube.crd_names ─────────────► gateway.desired_gateway_objects(...) ─┤
        Kube.apply / delete / patch_status / post_event  ◄──────────────────┘

Every decision (children, conditions, events, gateway objects, what is skipped and why)
is made by :func:`inference_cache.operator.backend.desired_backend` and
:func:`inference_cache.operator.gateway.desired_gateway_objects`; this module only moves
their results to the API. Its one choice of its own, :func:`stale_gateway_refs`, is pure
too: gateway objects emitted on the previous reconcile (``status.gateway.emitted``) and no
longer emitted are deleted, when the live object is still ours.

Failures: a failed read raises ``kopf.TemporaryError`` (kopf retries the handler); a failed
apply of the Deployment stops the managed children there (``backend`` module: never expose
or scale a workload whose Deployment was not written) and leaves ``observedGeneration``
alone; a gateway object whose apply fails is reported in ``status.gateway.skipped``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import kopf

from inference_cache.operator import backend, gateway
from inference_cache.operator.kube import Kube, KubeError, NotFound
from inference_cache.operator.metrics import METRICS, OperatorMetrics

Obj = dict[str, Any]

VERSION: Final = "v1alpha1"
PLURAL: Final = "cachebackends"
#: The apiVersion of each gateway kind we may have emitted (for pruning by kind/name).
GATEWAY_API_VERSIONS: Final = {
    "InferencePool": "inference.networking.k8s.io/v1",
    "EnvoyExtensionPolicy": "gateway.envoyproxy.io/v1alpha1",
    "BackendTrafficPolicy": "gateway.envoyproxy.io/v1alpha1",
}
#: Retry delay after a failed read of the observed objects, seconds.
RETRY_DELAY_S: Final = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackendHandlerSettings:
    """What the CacheBackend handlers pass to the pure functions."""

    gateway: gateway.GatewaySettings
    backend: backend.BackendSettings = field(default_factory=backend.BackendSettings)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one reconcile did (for the caller's log and the tests)."""

    applied: tuple[str, ...]
    deleted: tuple[str, ...]
    status: Obj
    requeue_after_s: float | None


def observe(kube: Kube, cr: Mapping[str, Any]) -> backend.Observed:
    """The live children named like ``cr`` and the pods of its namespace."""
    ns, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
    return backend.Observed(
        deployment=kube.get("apps/v1", "Deployment", ns, name),
        service=kube.get("v1", "Service", ns, name),
        hpa=kube.get("autoscaling/v2", "HorizontalPodAutoscaler", ns, name),
        pods=tuple(kube.list("v1", "Pod", namespace=ns)),
    )


def stale_gateway_refs(cr: Mapping[str, Any], plan: gateway.GatewayPlan) -> tuple[backend.ObjectRef, ...]:
    """Gateway objects the last reconcile emitted (``status.gateway.emitted``) that this
    plan does not: candidates for deletion (the caller checks the live object is ours)."""
    ns = cr["metadata"]["namespace"]
    previous = ((cr.get("status") or {}).get("gateway") or {}).get("emitted") or []
    now = {(e["kind"], e["name"]) for e in plan.emitted}
    return tuple(
        backend.ObjectRef(GATEWAY_API_VERSIONS[e["kind"]], e["kind"], ns, e["name"])
        for e in previous
        if e.get("kind") in GATEWAY_API_VERSIONS and (e["kind"], e.get("name")) not in now
    )


def _ours(live: Mapping[str, Any] | None, uid: str) -> bool:
    labels = ((live or {}).get("metadata") or {}).get("labels") or {}
    return labels.get(backend.MANAGED_BY_LABEL) == backend.MANAGED_BY and backend.owned_by(live, uid)


def _ref_name(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def reconcile(
    kube: Kube, cr: Mapping[str, Any], settings: BackendHandlerSettings, now: dt.datetime
) -> Outcome:
    """One reconcile of one CacheBackend (``cr`` as read from the API)."""
    meta = cr["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
    try:
        observed = observe(kube, cr)
        available = kube.crd_names()
    except KubeError as e:
        raise kopf.TemporaryError(f"reading the observed state failed: {e}", delay=RETRY_DELAY_S) from e
    plan = backend.desired_backend(cr, observed, settings.backend, now)
    gw = gateway.desired_gateway_objects(cr, settings.gateway, available)

    applied: list[str] = []
    deleted: list[str] = []
    complete = True
    for obj in plan.objects:
        try:
            kube.apply(obj)
        except KubeError as e:
            log.warning("CacheBackend %s/%s: applying %s failed: %s", ns, name, _ref_name(obj), e)
            complete = False
            break
        applied.append(_ref_name(obj))
    for ref in plan.deletes:
        if _delete(kube, ref):
            deleted.append(f"{ref.kind}/{ref.name}")

    emitted: list[gateway.Emitted] = []
    skipped = list(gw.skipped)
    for obj in gw.objects:
        try:
            kube.apply(obj)
        except KubeError as e:
            log.warning("CacheBackend %s/%s: applying %s failed: %s", ns, name, _ref_name(obj), e)
            complete = False
            skipped.append(gateway.Skipped(kind=obj["kind"], reason=f"apply failed: {e}"))
            continue
        applied.append(_ref_name(obj))
        emitted.append(gateway.Emitted(kind=obj["kind"], name=obj["metadata"]["name"]))
    for ref in stale_gateway_refs(cr, gw):
        try:
            live = kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
        except KubeError as e:
            log.warning("CacheBackend %s/%s: reading %s/%s failed: %s", ns, name, ref.kind, ref.name, e)
            continue
        if _ours(live, uid) and _delete(kube, ref):
            deleted.append(f"{ref.kind}/{ref.name}")

    status: Obj = {**plan.status, "gateway": {"emitted": emitted, "skipped": skipped}}
    if complete:
        status["observedGeneration"] = meta.get("generation")
    try:
        kube.patch_status(backend.API_VERSION, backend.KIND, ns, name, status)
    except NotFound:
        log.info("CacheBackend %s/%s is gone; status not written", ns, name)
    except KubeError as e:
        raise kopf.TemporaryError(f"writing status failed: {e}", delay=RETRY_DELAY_S) from e
    for event in plan.events:
        kube.post_event(cr, event.type, event.reason, event.message)
    return Outcome(tuple(applied), tuple(deleted), status, plan.requeue_after_s)


def _delete(kube: Kube, ref: backend.ObjectRef) -> bool:
    try:
        return kube.delete(ref.api_version, ref.kind, ref.namespace, ref.name)
    except KubeError as e:
        log.warning("deleting %s %s/%s failed: %s", ref.kind, ref.namespace, ref.name, e)
        return False


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def register(
    registry: kopf.OperatorRegistry,
    kube: Kube,
    settings: BackendHandlerSettings,
    clock: Callable[[], dt.datetime] = _utcnow,
    *,
    metrics: OperatorMetrics = METRICS,
) -> None:
    """Register the CacheBackend handlers: on create, update and resume, and a timer every
    ``settings.backend.resync_s`` (the plan's requeue: matchedEnginePods refresh, the
    first-KV-event timeout, rollout progress; kopf has no per-object requeue-after). Each
    run is counted under its handler id (``metrics.handler``)."""

    def handle(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        outcome = reconcile(kube, dict(body), settings, clock())
        if outcome.applied or outcome.deleted:
            logger.info(f"applied {list(outcome.applied)}, deleted {list(outcome.deleted)}")

    for handler_id, on in (
        ("reconcile-create", kopf.on.create),
        ("reconcile-update", kopf.on.update),
        ("reconcile-resume", kopf.on.resume),
    ):
        on(backend.GROUP, VERSION, PLURAL, id=handler_id, registry=registry)(
            metrics.handler(handler_id, backend.KIND)(handle)
        )
    kopf.timer(
        backend.GROUP,
        VERSION,
        PLURAL,
        id="reconcile-timer",
        interval=settings.backend.resync_s,
        initial_delay=settings.backend.resync_s,
        registry=registry,
    )(metrics.handler("reconcile-timer", backend.KIND)(handle))
