"""The operator's control-plane loops: ``/policy`` push, ``/snapshot`` poll, PromptTemplates.

Owner: ``inference_cache.operator`` (issue #7 seed §6.6-6.7; issue #8's operator path).
Thin wiring: every decision is a pure function (``operator.controlplane`` for the policy
and the snapshot, :func:`template_status` here for PromptTemplates); this module reads
through ``operator.kube.Kube``, calls them, and writes through ``Kube`` and
``operator.server_client.ServerClient``. Place in the flow::

    kopf watch events (CachePolicy, CacheTenant, PromptTemplate) ──wake──┐
    every 30 s ───────────────────────────────────────────────────────────┤
        policy loop:    list CachePolicy + CacheTenant ─► policy_payload ─► push_due ─► POST /policy
        snapshot loop:  GET /snapshot ─► cacheindex_status   ─► CacheIndex/cluster-default status
                                       ─► backend_participation ─► CacheBackend status patches
                                       ─► tenant_statuses    ─► CacheTenant status patches
        template loop:  list PromptTemplate ─► template_status ─► status patches (changed only)
                                            ─► all valid ones ─► PUT /templates (changed or 30 s)

Level-triggered: a watch event only wakes its loop, which re-reads everything it needs, so
a missed or coalesced event costs nothing and a failed tick (``KubeError``, ``ServerError``,
logged) is retried on the next one. The loops run in the operator process as tasks started
by kopf's startup handler and stopped by its cleanup handler; they assume one operator
replica (see docs/operator.md, "Control-plane loops and admission").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar

import kopf

from inference_cache.extproc import templates as templates_wire
from inference_cache.operator import controlplane
from inference_cache.operator.backend import API_VERSION, GROUP, Obj, make_condition
from inference_cache.operator.kube import Kube, KubeError, NotFound
from inference_cache.operator.metrics import METRICS, TICK_ERROR, TICK_OK, OperatorMetrics
from inference_cache.operator.server_client import ServerClient, ServerError

log = logging.getLogger(__name__)

VERSION: Final = API_VERSION.partition("/")[2]
#: The PromptTemplate condition that says the spec decoded (``True``) or not.
READY: Final = "Ready"
#: ``True`` with the decode error (path, line, column) when the spec is invalid.
INVALID: Final = "Invalid"

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """The loops' periods (seconds) and what ``CacheIndex.status.observedServer`` says."""

    policy_interval_s: float = controlplane.PUSH_INTERVAL_S
    snapshot_interval_s: float = 30.0
    templates_interval_s: float = 30.0
    observed_server: str = ""

    def __post_init__(self) -> None:
        for name in ("policy_interval_s", "snapshot_interval_s", "templates_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# -- pure decisions ---------------------------------------------------------------------------


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def template_status(
    cr: Mapping[str, Any], now: dt.datetime
) -> tuple[templates_wire.StoredTemplate | None, Obj]:
    """A PromptTemplate's decoded form (``None`` when invalid) and its desired ``status``.

    Valid: ``templateRevision`` = ``render.revision(spec)`` (what the server reports from
    RenderTemplate), ``Ready=True/TemplateValid``, ``Invalid=False/TemplateValid``.
    Invalid: no revision (the server does not have it: only valid templates are pushed),
    ``Ready=False/InvalidSpec`` and ``Invalid=True/InvalidSpec`` with the decode error
    (``spec.body (line 1, column 8): ...``)."""
    namespace, name = _key(cr)
    previous = (cr.get("status") or {}).get("conditions") or []
    generation = int((cr.get("metadata") or {}).get("generation") or 0)
    try:
        stored: templates_wire.StoredTemplate | None = templates_wire.build(
            namespace, name, cr.get("spec") or {}
        )
    except templates_wire.TemplateDecodeError as e:
        stored, message = None, str(e)
    if stored is not None:
        ok = "the spec is valid; pushed to the server with the other valid templates"
        conditions = [
            make_condition(previous, READY, True, "TemplateValid", ok, now=now, generation=generation),
            make_condition(previous, INVALID, False, "TemplateValid", ok, now=now, generation=generation),
        ]
    else:
        conditions = [
            make_condition(previous, READY, False, "InvalidSpec", message, now=now, generation=generation),
            make_condition(previous, INVALID, True, "InvalidSpec", message, now=now, generation=generation),
        ]
    status: Obj = {
        "templateRevision": stored.revision if stored is not None else None,
        "observedGeneration": generation,
        "conditions": conditions,
    }
    return stored, status


def status_patch(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> Obj | None:
    """The merge patch taking ``current`` status to ``wanted`` (top-level keys; a ``None``
    value removes the key), or ``None`` when nothing changes."""
    have = current or {}
    patch = {k: v for k, v in wanted.items() if have.get(k) != v}
    return patch or None


def spec_changed(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether a watch event can change what a loop computes: not a status write of ours
    (``status.observedGeneration`` already equals ``metadata.generation``)."""
    if event_type == "DELETED":
        return True
    generation = (body.get("metadata") or {}).get("generation")
    return generation is None or (body.get("status") or {}).get("observedGeneration") != generation


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the loops -----------------------------------------------------------------------------------


class ControlPlane:
    """The three loops over one :class:`Kube` and one :class:`ServerClient` (owned: closed
    by :meth:`stop`). ``clock`` (monotonic seconds) drives the re-push interval, ``now``
    the status timestamps; every tick's result goes to ``metrics.controlplane_ticks``."""

    def __init__(
        self,
        kube: Kube,
        server: ServerClient,
        settings: ControlPlaneSettings = ControlPlaneSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = _utcnow,
        metrics: OperatorMetrics = METRICS,
    ) -> None:
        self.kube = kube
        self.metrics = metrics
        self.server = server
        self.settings = settings
        self._clock = clock
        self._now = now
        self.last_policy: controlplane.PushRecord | None = None
        self.last_templates: controlplane.PushRecord | None = None
        self.policy_wake = asyncio.Event()
        self.templates_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _kube(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # Kube is synchronous (urllib3); keep the event loop (and kopf's watchers) free.
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- one tick each ---------------------------------------------------------------------

    async def sync_policy(self) -> bool:
        """List CachePolicies and CacheTenants, POST ``/policy`` when due; ``True`` if pushed."""
        policies = await self._kube(self.kube.list, API_VERSION, "CachePolicy")
        tenants = await self._kube(self.kube.list, API_VERSION, "CacheTenant")
        payload = controlplane.policy_payload(policies, tenants)
        now = self._clock()
        if not controlplane.push_due(payload, self.last_policy, now, self.settings.policy_interval_s):
            return False
        await self.server.push_policy(payload)
        self.last_policy = controlplane.PushRecord(payload, now)
        return True

    async def sync_snapshot(self) -> None:
        """GET ``/snapshot`` and write the CacheIndex, CacheBackend and CacheTenant statuses
        that changed."""
        snapshot = await self.server.snapshot()
        now = self._now()
        await self._sync_cache_index(snapshot, now)
        backends = await self._kube(self.kube.list, API_VERSION, "CacheBackend")
        pods: list[Obj] = []
        for namespace in sorted({_key(b)[0] for b in backends}):
            pods.extend(await self._kube(self.kube.list, "v1", "Pod", namespace=namespace))
        for (namespace, name), patch in sorted(
            controlplane.backend_participation(snapshot, pods, backends).items()
        ):
            await self._patch_status("CacheBackend", namespace, name, patch)
        tenants = await self._kube(self.kube.list, API_VERSION, "CacheTenant")
        current = {_key(t): t.get("status") for t in tenants}
        for key, wanted in sorted(controlplane.tenant_statuses(snapshot, tenants, now).items()):
            change = status_patch(current.get(key), wanted)
            if change is not None:
                await self._patch_status("CacheTenant", *key, change)

    async def _sync_cache_index(self, snapshot: Mapping[str, Any], now: dt.datetime) -> None:
        name = controlplane.CACHE_INDEX_NAME
        index = await self._kube(self.kube.get, API_VERSION, "CacheIndex", None, name)
        if index is None:
            obj = {"apiVersion": API_VERSION, "kind": "CacheIndex", "metadata": {"name": name}, "spec": {}}
            index = await self._kube(self.kube.create, obj)
        previous = index.get("status") or None
        wanted = controlplane.cacheindex_status(
            snapshot, now, server_url=self.settings.observed_server, previous=previous
        )
        if wanted != previous:
            await self._kube(self.kube.patch_status, API_VERSION, "CacheIndex", None, name, wanted)

    async def sync_templates(self) -> bool:
        """Write changed PromptTemplate statuses; PUT every valid template when the set
        changed or the interval passed. ``True`` if pushed."""
        crs = sorted(await self._kube(self.kube.list, API_VERSION, "PromptTemplate"), key=_key)
        now = self._now()
        valid: list[templates_wire.StoredTemplate] = []
        for cr in crs:
            stored, wanted = template_status(cr, now)
            if stored is not None:
                valid.append(stored)
            change = status_patch(cr.get("status"), wanted)
            if change is not None:
                await self._patch_status("PromptTemplate", *_key(cr), change)
        # A template's revision is its content hash: equal maps, equal pushed bodies.
        payload = {t.ref: t.revision for t in valid}
        at = self._clock()
        if not controlplane.push_due(payload, self.last_templates, at, self.settings.templates_interval_s):
            return False
        await self.server.put_templates(valid)
        self.last_templates = controlplane.PushRecord(payload, at)
        return True

    async def _patch_status(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        try:
            await self._kube(self.kube.patch_status, API_VERSION, kind, namespace, name, patch)
        except NotFound:  # deleted since it was listed
            log.debug("%s %s/%s gone before its status write", kind, namespace, name)

    # -- running -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the three loops (each ticks at once, then on wake-up or its interval)."""
        if self._tasks:
            return
        s = self.settings
        self._tasks = [
            asyncio.create_task(
                self._loop("policy", self.sync_policy, self.policy_wake, s.policy_interval_s)
            ),
            asyncio.create_task(self._loop("snapshot", self.sync_snapshot, None, s.snapshot_interval_s)),
            asyncio.create_task(
                self._loop("templates", self.sync_templates, self.templates_wake, s.templates_interval_s)
            ),
        ]

    async def stop(self) -> None:
        """Cancel the loops and close the server client."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.close()

    async def _loop(
        self, name: str, tick: Callable[[], Awaitable[object]], wake: asyncio.Event | None, interval: float
    ) -> None:
        waiter = wake if wake is not None else asyncio.Event()
        while True:
            waiter.clear()  # a wake-up during the tick runs the next one at once
            result = TICK_ERROR
            try:
                await tick()
                result = TICK_OK
            except (KubeError, ServerError) as e:
                log.warning(
                    "control-plane %s tick failed (retried in %gs or on change): %s", name, interval, e
                )
            except Exception:
                log.exception("control-plane %s tick failed unexpectedly", name)
            self.metrics.controlplane_ticks.labels(name, result).inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), interval)


# -- kopf ------------------------------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, plane: ControlPlane) -> None:
    """Register the kopf handlers of the loops on ``registry``: start/stop with the
    operator, wake the policy loop on CachePolicy/CacheTenant spec changes and the
    template loop on PromptTemplate spec changes (status writes of ours do not wake).
    The wake handlers are coroutines: kopf runs them on its loop, where the events live."""

    @kopf.on.startup(registry=registry, id="control-plane-start")
    async def start_control_plane(**_: Any) -> None:
        await plane.start()

    @kopf.on.cleanup(registry=registry, id="control-plane-stop")
    async def stop_control_plane(**_: Any) -> None:
        await plane.stop()

    async def wake_policy(type: str | None, body: kopf.Body, **_: Any) -> None:
        if spec_changed(type, body):
            plane.policy_wake.set()

    kopf.on.event(GROUP, VERSION, "cachepolicies", id="wake-policy-cachepolicies", registry=registry)(
        wake_policy
    )
    kopf.on.event(GROUP, VERSION, "cachetenants", id="wake-policy-cachetenants", registry=registry)(
        wake_policy
    )

    @kopf.on.event(GROUP, VERSION, "prompttemplates", id="wake-templates", registry=registry)
    async def wake_templates(type: str | None, body: kopf.Body, **_: Any) -> None:
        if spec_changed(type, body):
            plane.templates_wake.set()
