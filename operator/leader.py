"""Leader election for ``inference-cache operator --leader-elect``: one Lease, one leader.

Owner: ``inference_cache.operator`` (issue #7). Place in the flow: ``operator.main`` blocks
in :meth:`LeaderElector.acquire` before it starts kopf (so no handler, control-plane loop
or webhook runs on a standby replica), then runs kopf inside :func:`leading`, which renews
the lease in the background; when the lease is lost, kopf is stopped and the process exits
non-zero, and the Deployment restarts it as a standby.

The record is a ``coordination.k8s.io/v1`` Lease (``inference-cache-operator-leader`` in
the operator's namespace), read and written through :class:`~inference_cache.operator.
kube.Kube`: ``create`` when absent, a JSON merge patch carrying the observed
``metadata.resourceVersion`` otherwise (optimistic concurrency: a 409 means another replica
wrote first, and it won). As in client-go, expiry is judged by *our* clock since we last saw
the record change, never by the holder's ``renewTime`` (clocks of different nodes may
disagree): a lease is free when absent, released (no holder), ours, or unchanged for
``leaseDurationSeconds``. On a clean shutdown the leader releases the lease (empty holder,
1 s duration), so a successor does not wait for expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from inference_cache.operator.kube import Conflict, Kube, KubeError

API_VERSION: Final = "coordination.k8s.io/v1"
KIND: Final = "Lease"
LEASE_NAME: Final = "inference-cache-operator-leader"
#: ``MicroTime``: RFC 3339 with microseconds, UTC.
_MICRO_TIME: Final = "%Y-%m-%dT%H:%M:%S.%fZ"

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Who we are and the timing (client-go's defaults: 15 s lease, renew within 10 s,
    retry every 2 s; we renew every 5 s)."""

    namespace: str
    identity: str
    name: str = LEASE_NAME
    lease_duration_s: int = 15
    renew_every_s: float = 5.0
    renew_deadline_s: float = 10.0
    retry_every_s: float = 2.0


class LeaseLost(Exception):
    """The lease went to another replica, or could not be renewed in time."""


def micro_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(_MICRO_TIME)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """One replica's view of the lease (see the module docstring). ``try_acquire_or_renew``
    is one synchronous round against the API; ``acquire`` and ``hold`` loop over it."""

    def __init__(
        self, kube: Kube, settings: LeaseSettings, *, clock: Clock = _utcnow, sleep: Sleep = asyncio.sleep
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        #: The spec last seen, and when (our clock) it last changed.
        self._observed: Mapping[str, Any] | None = None
        self._observed_at: dt.datetime | None = None

    @property
    def identity(self) -> str:
        return self._settings.identity

    def _observe(self, spec: Mapping[str, Any], now: dt.datetime) -> None:
        if spec != self._observed:
            self._observed, self._observed_at = dict(spec), now

    def _expired(self, now: dt.datetime) -> bool:
        assert self._observed is not None and self._observed_at is not None
        duration = int(self._observed.get("leaseDurationSeconds") or self._settings.lease_duration_s)
        return self._observed_at + dt.timedelta(seconds=duration) <= now

    def try_acquire_or_renew(self) -> bool:
        """Create, renew or take over the lease; ``True`` when we hold it afterwards.

        ``False`` when another holder's lease is fresh, or another replica won a race (409).
        Other API errors propagate (:class:`KubeError`)."""
        s, now = self._settings, self._clock()
        lease = self._kube.get(API_VERSION, KIND, s.namespace, s.name)
        if lease is None:
            created: dict[str, Any] = {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": s.lease_duration_s,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": 0,
            }
            body = {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": s.name, "namespace": s.namespace},
            }
            try:
                self._kube.create({**body, "spec": created})
            except Conflict:
                return False
            self._observe(created, now)
            return True
        spec = lease.get("spec") or {}
        self._observe(spec, now)
        holder = spec.get("holderIdentity") or ""
        ours = holder == s.identity
        if holder and not ours and not self._expired(now):
            return False
        update: dict[str, Any] = {
            "holderIdentity": s.identity,
            "leaseDurationSeconds": s.lease_duration_s,
            "renewTime": micro_time(now),
        }
        if not ours:
            update["acquireTime"] = micro_time(now)
            update["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        return self._write(lease, update, now)

    def _write(self, lease: Mapping[str, Any], update: Mapping[str, Any], now: dt.datetime) -> bool:
        s = self._settings
        patch = {
            "metadata": {"resourceVersion": lease["metadata"].get("resourceVersion")},
            "spec": dict(update),
        }
        try:
            stored = self._kube.patch(API_VERSION, KIND, s.namespace, s.name, patch)
        except Conflict:
            return False
        self._observe(stored.get("spec") or {**(lease.get("spec") or {}), **update}, now)
        return True

    def release(self) -> None:
        """Give the lease up if we hold it (best effort: errors are logged)."""
        s = self._settings
        try:
            lease = self._kube.get(API_VERSION, KIND, s.namespace, s.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != s.identity:
                return
            now = self._clock()
            self._write(
                lease, {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": micro_time(now)}, now
            )
        except KubeError as e:
            log.warning("lease %s/%s not released: %s", s.namespace, s.name, e)

    async def acquire(self) -> None:
        """Block until we hold the lease (retrying every ``retry_every_s``; API errors are
        logged and retried)."""
        s = self._settings
        log.info("waiting for lease %s/%s as %s", s.namespace, s.name, s.identity)
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    log.info("acquired lease %s/%s as %s", s.namespace, s.name, s.identity)
                    return
            except KubeError as e:
                log.warning("lease %s/%s: %s", s.namespace, s.name, e)
            await self._sleep(s.retry_every_s)

    async def hold(self) -> None:
        """Renew every ``renew_every_s`` until the lease is lost: raises :class:`LeaseLost`
        when another replica holds it, or when no renewal succeeded for
        ``renew_deadline_s`` (API errors in between are logged and retried)."""
        s = self._settings
        renewed = self._clock()
        while True:
            await self._sleep(s.renew_every_s)
            try:
                if not await asyncio.to_thread(self.try_acquire_or_renew):
                    raise LeaseLost(f"lease {s.namespace}/{s.name} is held by another replica")
                renewed = self._clock()
            except KubeError as e:
                log.warning("lease %s/%s not renewed: %s", s.namespace, s.name, e)
                if (self._clock() - renewed).total_seconds() >= s.renew_deadline_s:
                    raise LeaseLost(
                        f"lease {s.namespace}/{s.name} not renewed for {s.renew_deadline_s:g} s"
                    ) from e


@contextlib.asynccontextmanager
async def leading(elector: LeaderElector | None, stop: asyncio.Event) -> AsyncIterator[None]:
    """Renew the lease in the background while the body runs (no-op without an elector).

    When the lease is lost, ``stop`` is set (the body, kopf, shuts down) and leaving the
    block raises :class:`LeaseLost`; after a clean stop the lease is released."""
    if elector is None:
        yield
        return
    lost: list[LeaseLost] = []

    async def renew() -> None:
        try:
            await elector.hold()
        except LeaseLost as e:
            log.error("%s: stopping", e)
            lost.append(e)
            stop.set()

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if lost:
        raise lost[0]
    await asyncio.to_thread(elector.release)
