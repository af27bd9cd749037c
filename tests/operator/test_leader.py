"""operator/leader.py against kmock: acquiring an absent lease (create), waiting while
another holder's lease is fresh, taking over an expired one, renewing, losing on a 409 or
after the renew deadline, releasing on a clean stop; and ``main.operate``'s wiring (kopf
starts only once the lease is held, and is stopped when it is lost). The clock is injected and ``sleep``
advances it: nothing waits for real time."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import kmock
import pytest
from kubernetes import client as k8s

from inference_cache import cli
from inference_cache.operator import kube, leader, main

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
NS = "ic-system"
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{leader.LEASE_NAME}"


class FakeTime:
    """The injected clock; ``sleep`` advances it instead of waiting (and fails the test
    after two minutes of fake time, so a loop that never ends cannot hang it)."""

    def __init__(self) -> None:
        self.now = T0
        self.slept: list[float] = []

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        if self.now - T0 > dt.timedelta(minutes=2):
            raise AssertionError("slept for two minutes of fake time")


def status(code: int, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "message": message}


def lease_of(holder: str, renewed: dt.datetime, *, rv: str = "1", transitions: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": leader.API_VERSION,
        "kind": leader.KIND,
        "metadata": {"name": leader.LEASE_NAME, "namespace": NS, "resourceVersion": rv},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": leader.micro_time(renewed),
            "renewTime": leader.micro_time(renewed),
            "leaseTransitions": transitions,
        },
    }


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def elector(api: k8s.ApiClient, time: FakeTime) -> leader.LeaderElector:
    settings = leader.LeaseSettings(namespace=NS, identity="operator-a")
    return leader.LeaderElector(kube.Kube(api, timeout_s=10), settings, clock=time, sleep=time.sleep)


def stored(kmock: kmock.KubernetesEmulator) -> dict[str, Any]:
    return dict(kmock.objects[LEASES, NS, leader.LEASE_NAME])


async def test_acquires_an_absent_lease_by_creating_it(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector
) -> None:
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is True
    (post,) = kmock["post"]
    assert post.url.path == f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    assert post.data["spec"] == {
        "holderIdentity": "operator-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-01-02T03:04:05.000000Z",
        "renewTime": "2026-01-02T03:04:05.000000Z",
        "leaseTransitions": 0,
    }
    assert stored(kmock)["spec"]["holderIdentity"] == "operator-a"


async def test_a_lost_create_race_is_not_leadership(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector
) -> None:
    kmock["post", LEASES] << 409 << status(409, "leases.coordination.k8s.io already exists")
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is False


async def test_waits_while_another_holders_lease_is_fresh_then_takes_it_over(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", T0, transitions=3)
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is False
    time.advance(14)  # unchanged for less than leaseDurationSeconds: still b's
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is False
    assert len(kmock["patch"]) == 0
    time.advance(1)  # unchanged for 15 s since we first saw it: expired
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is True
    (patch,) = kmock["patch"]
    assert patch.url.path == LEASE_PATH
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert patch.data["metadata"] == {"resourceVersion": "1"}  # a stale one is a 409
    spec = stored(kmock)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("operator-a", 4)
    assert spec["acquireTime"] == spec["renewTime"] == "2026-01-02T03:04:20.000000Z"


async def test_a_renewing_holder_keeps_its_lease(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", T0)
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is False
    time.advance(10)
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", time.now, rv="2")
    time.advance(10)  # 20 s after the first look, but only 10 s after b renewed
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is False


async def test_a_released_lease_is_taken_at_once(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("", T0)
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is True
    assert stored(kmock)["spec"]["holderIdentity"] == "operator-a"


async def test_renews_its_own_lease(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-a", T0, transitions=2)
    time.advance(5)
    assert await asyncio.to_thread(elector.try_acquire_or_renew) is True
    (patch,) = kmock["patch"]
    assert patch.data["spec"] == {
        "holderIdentity": "operator-a",
        "leaseDurationSeconds": 15,
        "renewTime": "2026-01-02T03:04:10.000000Z",
    }
    spec = stored(kmock)["spec"]
    assert (spec["acquireTime"], spec["leaseTransitions"]) == ("2026-01-02T03:04:05.000000Z", 2)


async def test_acquire_retries_until_the_lease_is_free(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", T0)
    await elector.acquire()
    assert stored(kmock)["spec"]["holderIdentity"] == "operator-a"
    assert time.now == T0 + dt.timedelta(seconds=16)  # eight 2 s retries
    assert time.slept == [2.0] * 8


async def test_hold_renews_every_5s_and_is_lost_on_a_409(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-a", T0)
    kmock["patch", LEASES] << 409 << status(409, "the object has been modified")
    with pytest.raises(leader.LeaseLost, match="held by another replica"):
        await elector.hold()
    assert time.slept == [5.0]
    assert len(kmock["patch"]) == 1


async def test_hold_is_lost_when_another_replica_holds_the_lease(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", T0)
    with pytest.raises(leader.LeaseLost):
        await elector.hold()
    assert len(kmock["patch"]) == 0


async def test_hold_survives_api_errors_until_the_renew_deadline(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector, time: FakeTime
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-a", T0)
    kmock["get", LEASES] << 503 << status(503, "etcd")
    with pytest.raises(leader.LeaseLost, match="not renewed for 10 s"):
        await elector.hold()
    assert time.slept == [5.0, 5.0]  # the first failure at 5 s is retried, the second gives up


async def test_leading_stops_the_body_and_raises_when_the_lease_is_lost(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", T0)
    stop = asyncio.Event()
    with pytest.raises(leader.LeaseLost):
        async with leader.leading(elector, stop):
            await asyncio.wait_for(stop.wait(), timeout=30)
    assert stop.is_set()


async def test_leading_releases_the_lease_after_a_clean_stop(
    kmock: kmock.KubernetesEmulator, api: k8s.ApiClient
) -> None:
    # A real-time sleep that never finishes within the body: the renewal task is cancelled.
    settings = leader.LeaseSettings(namespace=NS, identity="operator-a", renew_every_s=3600)
    elector = leader.LeaderElector(kube.Kube(api, timeout_s=10), settings, clock=lambda: T0)
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-a", T0)
    async with leader.leading(elector, asyncio.Event()):
        pass
    spec = stored(kmock)["spec"]
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"]) == ("", 1)


async def test_release_leaves_another_holders_lease_alone(
    kmock: kmock.KubernetesEmulator, elector: leader.LeaderElector
) -> None:
    kmock.objects[LEASES, NS, leader.LEASE_NAME] = lease_of("operator-b", T0)
    await asyncio.to_thread(elector.release)
    assert len(kmock["patch"]) == 0
    assert stored(kmock)["spec"]["holderIdentity"] == "operator-b"


async def test_without_an_elector_leading_does_nothing(kmock: kmock.KubernetesEmulator) -> None:
    async with leader.leading(None, asyncio.Event()):
        pass
    assert len(kmock["get"]) == 0


class FakeKopf:
    """Stands in for ``kopf.operator``: records the call, runs until its stop flag."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, *, stop_flag: asyncio.Event, **_: Any) -> None:
        self.calls += 1
        await stop_flag.wait()


def operator_config() -> main.OperatorConfig:
    argv = ["operator", "--leader-elect", "--health-probe-bind-address=0", "--webhook-bind-address=0"]
    return main.config_from_args(cli.build_parser(argv).parse_args(argv))


async def test_operate_starts_no_kopf_on_a_standby(
    kmock: kmock.KubernetesEmulator,
    elector: leader.LeaderElector,
    api: k8s.ApiClient,
    time: FakeTime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKopf()
    monkeypatch.setattr(main.kopf, "operator", fake)
    # b keeps renewing: every read sees a new renewTime, so the lease never expires.
    kmock["get", LEASES] << (lambda req: lease_of("operator-b", time.now))
    config = operator_config()
    with pytest.raises(AssertionError, match="two minutes of fake time"):
        await main.operate(config, main.kopf.OperatorRegistry(), kube.Kube(api), elector=elector)
    assert fake.calls == 0


async def test_operate_runs_kopf_while_leading_and_stops_it_when_the_lease_is_lost(
    kmock: kmock.KubernetesEmulator,
    elector: leader.LeaderElector,
    api: k8s.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKopf()
    monkeypatch.setattr(main.kopf, "operator", fake)
    kmock["patch", LEASES] << 409 << status(409, "the object has been modified")
    config = operator_config()
    with pytest.raises(leader.LeaseLost):
        await main.operate(config, main.kopf.OperatorRegistry(), kube.Kube(api), elector=elector)
    assert fake.calls == 1
    assert len(kmock["post"]) == 1  # created the lease, then lost its first renewal
