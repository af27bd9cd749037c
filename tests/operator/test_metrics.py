"""The operator's Prometheus series (operator/metrics.py): the handler and admission
wrappers count what a kopf function returned or raised, the pod webhook reports its own
admitted result, the server client counts its calls by result, and the real health server
(127.0.0.1) serves ``/metrics`` on a standby and on the leader, the leader gauge flipping
when the lease is acquired and back when kopf stops (kopf runs against kmock's emulator).
The whole process counting a reconcile is in ``test_main``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import kmock
import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes import client as k8s

from inference_cache.operator import handlers_webhooks, kube, leader, main, webhook
from inference_cache.operator import metrics as m
from inference_cache.operator.server_client import (
    ServerClient,
    ServerClientSettings,
    ServerRejected,
    ServerUnavailable,
)

from .test_main import _until, parse


def value(metrics: m.OperatorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _raiser(exc: BaseException | None) -> Callable[..., Any]:
    def fn(**_: Any) -> str:
        if exc is not None:
            raise exc
        return "done"

    return fn


OUTCOMES = [
    (None, m.OUTCOME_OK),
    (kopf.TemporaryError("later", delay=1), m.OUTCOME_TEMPORARY),
    (kopf.PermanentError("never"), m.OUTCOME_PERMANENT),
    (RuntimeError("bug"), m.OUTCOME_ERROR),
]


@pytest.mark.parametrize(("exc", "outcome"), OUTCOMES)
def test_the_handler_wrapper_counts_each_outcome_and_passes_it_on(
    exc: BaseException | None, outcome: str
) -> None:
    metrics = m.OperatorMetrics()
    wrapped = metrics.handler("reconcile-update", "CacheBackend")(_raiser(exc))
    if exc is None:
        assert wrapped(body={}) == "done"
    else:
        with pytest.raises(type(exc)):
            wrapped(body={})
    labels = {"handler": "reconcile-update", "kind": "CacheBackend"}
    for other in {o for _, o in OUTCOMES}:
        want = 1.0 if other == outcome else 0.0
        assert value(metrics, "inferencecache_operator_handler_runs_total", **labels, outcome=other) == want
    assert value(metrics, "inferencecache_operator_handler_duration_seconds_count", **labels) == 1.0


@pytest.mark.parametrize(("exc", "outcome"), OUTCOMES)
async def test_the_handler_wrapper_keeps_a_coroutine_a_coroutine(
    exc: BaseException | None, outcome: str
) -> None:
    metrics = m.OperatorMetrics()

    async def fn(**_: Any) -> str:
        return _raiser(exc)()  # type: ignore[no-any-return]

    wrapped = metrics.handler("h", "K")(fn)
    assert asyncio.iscoroutinefunction(wrapped)  # kopf awaits it instead of using a thread
    with contextlib.suppress(type(exc) if exc is not None else ()):
        await wrapped()
    assert (
        value(metrics, "inferencecache_operator_handler_runs_total", handler="h", kind="K", outcome=outcome)
        == 1
    )


@pytest.mark.parametrize(
    ("returned", "exc", "result"),
    [
        (None, None, m.RESULT_ALLOWED),
        (m.RESULT_SKIPPED, None, m.RESULT_SKIPPED),
        (m.RESULT_FAIL_OPEN, None, m.RESULT_FAIL_OPEN),
        ("anything else", None, m.RESULT_ALLOWED),
        (None, kopf.AdmissionError("invalid", code=422), m.RESULT_DENIED),
        (None, kopf.AdmissionError("cannot list", code=503), m.RESULT_UNAVAILABLE),
        (None, ValueError("bug"), m.RESULT_ERROR),
    ],
)
def test_the_admission_wrapper_counts_the_result_and_returns_nothing_to_kopf(
    returned: str | None, exc: BaseException | None, result: str
) -> None:
    metrics = m.OperatorMetrics()

    def fn(**_: Any) -> str | None:
        if exc is not None:
            raise exc
        return returned

    wrapped = metrics.admission("validate-x")(fn)
    if exc is None:
        assert wrapped() is None
    else:
        with pytest.raises(type(exc)):
            wrapped()
    samples = {
        s.labels["result"]: s.value
        for f in metrics.registry.collect()
        if f.name == "inferencecache_operator_admissions"
        for s in f.samples
    }
    assert samples == {result: 1.0}


class _Backends:
    """A ``Kube`` whose CacheBackend listing returns ``items`` or raises ``error``."""

    def __init__(self, items: list[dict[str, Any]], error: kube.KubeError | None = None) -> None:
        self.items, self.error = items, error

    def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        if self.error is not None:
            raise self.error
        return self.items


POD = {
    "metadata": {"name": "vllm-0", "namespace": "llm", "labels": {"app": "vllm"}},
    "spec": {"containers": []},
}


@pytest.mark.parametrize(
    ("fake", "result"),
    [
        (_Backends([]), m.RESULT_SKIPPED),
        (_Backends([], kube.KubeError("etcd is down")), m.RESULT_FAIL_OPEN),
    ],
)
def test_the_pod_webhook_reports_skipped_and_fail_open(fake: _Backends, result: str) -> None:
    patch, warnings = kopf.Patch(), cast(list[str], [])
    got = handlers_webhooks.mutate_pod(cast(kube.Kube, fake), webhook.WebhookSettings(), POD, patch, warnings)
    assert got == result


def test_the_pod_webhook_reports_an_internal_error_as_fail_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(webhook, "select_backend", boom)
    got = handlers_webhooks.mutate_pod(
        cast(kube.Kube, _Backends([])), webhook.WebhookSettings(), POD, kopf.Patch(), []
    )
    assert got == m.RESULT_FAIL_OPEN


async def test_server_calls_are_counted_by_call_and_result() -> None:
    statuses = [200, 400, 503]

    async def handle(_: web.Request) -> web.Response:
        return web.Response(status=statuses.pop(0), body=b"{}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    metrics = m.OperatorMetrics()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with ServerClient(ServerClientSettings(url=url, token_file=None), metrics=metrics) as client:
            await client.push_policy({})
            with pytest.raises(ServerRejected):
                await client.push_policy({})
            with pytest.raises(ServerUnavailable):
                await client.snapshot()
    finally:
        await server.close()
    name = "inferencecache_operator_server_requests_total"
    assert value(metrics, name, call="policy", result=m.REQUEST_OK) == 1
    assert value(metrics, name, call="policy", result=m.REQUEST_REJECTED) == 1
    assert value(metrics, name, call="snapshot", result=m.REQUEST_UNAVAILABLE) == 1
    assert value(metrics, name, call="snapshot", result=m.REQUEST_OK) == 0


# -- /metrics on the real health server, standby then leader --------------------------------


class GatedElector(leader.LeaderElector):
    """A lease granted when the test says so, held until cancelled, released silently."""

    def __init__(self) -> None:
        super().__init__(kube.Kube(k8s.ApiClient()), leader.LeaseSettings(namespace="ns", identity="me"))
        self.granted = asyncio.Event()

    async def acquire(self) -> None:
        await self.granted.wait()

    async def hold(self) -> None:
        await asyncio.Event().wait()

    def release(self) -> None:
        return None


async def _scrape(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, r.headers["Content-Type"], await r.text()


def _leader_line(text: str) -> str:
    (line,) = [x for x in text.splitlines() if x.startswith("inferencecache_operator_leader ")]
    return line


async def test_metrics_are_served_on_a_standby_and_on_the_leader(
    kmock: kmock.KubernetesEmulator, unused_tcp_port: int, tmp_path: Path
) -> None:
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list"})
    config = main.config_from_args(
        parse("--webhook-bind-address=0", f"--health-probe-bind-address=127.0.0.1:{unused_tcp_port}")
    )
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry, id="login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"))

    metrics, elector = m.OperatorMetrics(), GatedElector()
    metrics.leader.set(1)  # operate() must reset it: a standby is not the leader
    stop, ready = asyncio.Event(), asyncio.Event()
    base = f"http://127.0.0.1:{unused_tcp_port}"
    task = asyncio.create_task(
        main.operate(
            config,
            registry,
            kube.Kube(k8s.ApiClient()),
            elector=elector,
            stop_flag=stop,
            ready_flag=ready,
            metrics=metrics,
        )
    )
    try:

        async def serving() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                return (await _scrape(f"{base}/healthz"))[0] == 200
            return False

        await _until(serving, "/healthz")
        status, content_type, text = await _scrape(f"{base}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert _leader_line(text) == "inferencecache_operator_leader 0.0"
        assert "process_cpu_seconds_total" in text
        assert (await _scrape(f"{base}/readyz"))[0] == 503

        elector.granted.set()

        async def leading() -> bool:
            return _leader_line((await _scrape(f"{base}/metrics"))[2]) == "inferencecache_operator_leader 1.0"

        await _until(leading, "the leader gauge at 1")
    finally:
        stop.set()
        elector.granted.set()  # a standby waits for the lease whatever the stop flag says
        await asyncio.wait_for(task, timeout=30)
    assert value(metrics, "inferencecache_operator_leader") == 0.0
