"""The operator's own Prometheus series (``inferencecache_operator_*``), served on ``/metrics``.

Owner: ``inference_cache.operator``. Place in the flow::

    kopf ──► handle()  (CacheBackend reconcile) ──► OperatorMetrics.handler ──► handler_runs, _duration
    kopf ──► on_*()    (admission webhooks)     ──► OperatorMetrics.admission ─► admissions
    ServerClient._call (GET /snapshot, POST /policy, PUT /templates) ─────────► server_requests
    ControlPlane._loop (one tick of each control-plane loop) ─────────────────► controlplane_ticks
    main.operate (lease acquired / kopf stopped) ─────────────────────────────► leader
                                                 health server ``GET /metrics`` ◄── registry

One :class:`OperatorMetrics` per process: :data:`METRICS`, the default of every
``register``/constructor that takes one (tests pass their own). Handlers stay thin: the
kopf functions are wrapped once, at registration, by :meth:`OperatorMetrics.handler` and
:meth:`OperatorMetrics.admission`; the outcome is read from what the function returned
or raised, as kopf itself reads it. Counters appear at their first increment (no
``*_created`` series, as on the server).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import kopf
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

#: ``handler_runs_total{outcome}``: the function returned.
OUTCOME_OK: Final = "ok"
#: It raised ``kopf.TemporaryError``: kopf retries after the error's delay.
OUTCOME_TEMPORARY: Final = "temporary"
#: It raised ``kopf.PermanentError``: kopf gives the handler up for this change.
OUTCOME_PERMANENT: Final = "permanent"
#: It raised anything else: kopf retries it with its backoff (an arbitrary error).
OUTCOME_ERROR: Final = "error"

#: ``admissions_total{result}``: admitted (for the pod webhook: with the engine injected).
RESULT_ALLOWED: Final = "allowed"
#: The pod webhook admitted the pod without injection (opt-out, no CacheBackend selects it, ...).
RESULT_SKIPPED: Final = "skipped"
#: The pod webhook admitted the pod unchanged after an error (CacheBackends not listable, a bug).
RESULT_FAIL_OPEN: Final = "fail_open"
#: ``kopf.AdmissionError``: the object is refused (invalid).
RESULT_DENIED: Final = "denied"
#: ``kopf.AdmissionError`` with code 503: what the check needs could not be read (fail closed).
RESULT_UNAVAILABLE: Final = "unavailable"
#: Any other exception: kopf refuses the object with it (a bug).
RESULT_ERROR: Final = "error"
#: The results an admission function may return itself (the pod webhook never raises).
ADMITTED_RESULTS: Final = frozenset({RESULT_ALLOWED, RESULT_SKIPPED, RESULT_FAIL_OPEN})
#: ``AdmissionError.code`` that :data:`RESULT_UNAVAILABLE` stands for (handlers_webhooks.UNAVAILABLE_CODE).
UNAVAILABLE_CODE: Final = 503

#: ``server_requests_total{result}``: a 2xx.
REQUEST_OK: Final = "ok"
#: ``ServerUnavailable``: no connection, timeout, a 5xx, no readable token.
REQUEST_UNAVAILABLE: Final = "unavailable"
#: ``ServerRejected``: a 4xx (a body the server refused, or our identity).
REQUEST_REJECTED: Final = "rejected"

#: ``controlplane_ticks_total{result}``: the tick finished.
TICK_OK: Final = "ok"
#: It failed (``KubeError``, ``ServerError`` or anything unexpected): retried next tick.
TICK_ERROR: Final = "error"

#: Reconcile duration buckets, seconds: a reconcile is a handful of API round trips.
HANDLER_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_F = TypeVar("_F", bound=Callable[..., Any])


def handler_outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label of a kopf handler run that raised ``exc`` (``None``: returned)."""
    if exc is None:
        return OUTCOME_OK
    if isinstance(exc, kopf.TemporaryError):
        return OUTCOME_TEMPORARY
    if isinstance(exc, kopf.PermanentError):
        return OUTCOME_PERMANENT
    return OUTCOME_ERROR


def admission_result(exc: BaseException) -> str:
    """The ``result`` label of an admission function that raised ``exc``."""
    if isinstance(exc, kopf.AdmissionError):
        return RESULT_UNAVAILABLE if exc.code == UNAVAILABLE_CODE else RESULT_DENIED
    return RESULT_ERROR


def _wrap(fn: _F, before: Callable[[], Any], after: Callable[[Any, Any, BaseException | None], Any]) -> _F:
    """``fn`` (sync or coroutine function, kept so: kopf runs sync handlers in its thread
    pool) calling ``before()`` first and ``after(state, result, exc)`` on leaving."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            state = before()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                after(state, None, e)
                raise
            return after(state, result, None)

        return cast(_F, run_async)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        state = before()
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            after(state, None, e)
            raise
        return after(state, result, None)

    return cast(_F, run)


class OperatorMetrics:
    """The operator's registry and series (see the module docstring)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.handler_runs = Counter(
            "inferencecache_operator_handler_runs",
            "kopf resource handler runs by handler id, resource kind and outcome.",
            ["handler", "kind", "outcome"],
            registry=r,
        )
        self.handler_duration = Histogram(
            "inferencecache_operator_handler_duration_seconds",
            "Wall time of one kopf resource handler run, whatever its outcome.",
            ["handler", "kind"],
            buckets=HANDLER_BUCKETS,
            registry=r,
        )
        self.leader = Gauge(
            "inferencecache_operator_leader",
            "1 while this replica runs kopf (holds the leader Lease, or runs without --leader-elect).",
            registry=r,
        )
        self.admissions = Counter(
            "inferencecache_operator_admissions",
            "Admission requests answered by the operator's webhooks, by webhook path and result.",
            ["webhook", "result"],
            registry=r,
        )
        self.server_requests = Counter(
            "inferencecache_operator_server_requests",
            "Calls to the server's controller listener, by call and result.",
            ["call", "result"],
            registry=r,
        )
        self.controlplane_ticks = Counter(
            "inferencecache_operator_controlplane_ticks",
            "Ticks of the control-plane loops (policy, snapshot, templates), by loop and result.",
            ["loop", "result"],
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def handler(self, handler: str, kind: str) -> Callable[[_F], _F]:
        """Decorator for a kopf resource handler: +1 ``handler_runs`` with the outcome
        (:func:`handler_outcome`) and its duration, per run; the exception still goes to kopf."""

        def decorate(fn: _F) -> _F:
            def after(started: float, result: Any, exc: BaseException | None) -> Any:
                self.handler_duration.labels(handler, kind).observe(time.monotonic() - started)
                self.handler_runs.labels(handler, kind, handler_outcome(exc)).inc()
                return result

            return _wrap(fn, time.monotonic, after)

        return decorate

    def admission(self, webhook: str) -> Callable[[_F], _F]:
        """Decorator for a kopf admission handler: +1 ``admissions`` per request. A raise
        counts by :func:`admission_result` (and still reaches kopf); a return counts the
        result the function returned when it is one of :data:`ADMITTED_RESULTS`, else
        ``allowed``. kopf always gets ``None`` back."""

        def decorate(fn: _F) -> _F:
            def after(_: None, result: Any, exc: BaseException | None) -> None:
                if exc is not None:
                    outcome = admission_result(exc)
                else:
                    outcome = result if result in ADMITTED_RESULTS else RESULT_ALLOWED
                self.admissions.labels(webhook, outcome).inc()

            return _wrap(fn, lambda: None, after)

        return decorate

    def exposition(self) -> bytes:
        """The registry in the classic text format (``text/plain; version=0.0.4``)."""
        return generate_latest(self.registry)


#: The process's metrics (the default everywhere one is taken).
METRICS: Final = OperatorMetrics()
