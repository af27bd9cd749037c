"""The control-plane loops' pure parts (``inference_cache.operator.controlplane``).

We test: the ``/policy`` v7 payload built from CachePolicy/CacheTenant CRs is accepted by
the server's own decoder (``extproc.policy_wire.decode``) and decodes to the intended
policies (first per namespace, quota-bearing tenants deduplicated); the push schedule;
and the CacheIndex, CacheBackend participation and CacheTenant statuses derived from the
``/snapshot`` bytes that ``index.snapshot`` encodes for a real, filled ``Index``, with rows
attributed to pods by pod IP. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from inference_cache.extproc import policy_wire
from inference_cache.index import policy as index_policy
from inference_cache.index import snapshot, store, types
from inference_cache.operator import controlplane as cp
from inference_cache.operator import crds

from . import crd_validate as cv

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
NOW = dt.datetime(2023, 11, 14, 23, 0, 0, tzinfo=dt.UTC)


def meta(namespace: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "generation": 1, **extra}


def cpol(namespace: str, name: str = "policy", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CachePolicy",
        "metadata": meta(namespace, name),
        "spec": spec,
    }


def ctenant(
    namespace: str, name: str, tenant_id: str, quota: int | None = None, **status: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {"tenantID": tenant_id, "isolationMode": "Fairness"}
    if quota is not None:
        spec["quota"] = {"maxIndexEntries": quota}
    return {"kind": "CacheTenant", "metadata": meta(namespace, name), "spec": spec, "status": status}


# -- /policy -----------------------------------------------------------------------------


def decode(payload: dict[str, Any]) -> policy_wire.PolicySnapshot:
    return policy_wire.decode(json.dumps(payload).encode())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({}, index_policy.NamespacePolicy(namespace="a"), id="crd-defaults-absent"),
        pytest.param(
            {
                "eviction": "LFU",
                "evictionTTL": "15m",
                "minimumPrefixTokens": 32,
                "minimumMatchedTokens": 128,
                "routingFloorScore": "5.5",
                "lookupTimeoutMs": 25,
                "affinityRouting": "Disabled",
                "strategy": {"enableChainMatching": False, "requireChain": True, "enableTenantHot": False},
            },
            index_policy.NamespacePolicy(
                namespace="a",
                eviction="lfu",
                eviction_ttl_s=900.0,
                minimum_prefix_tokens=32,
                minimum_matched_tokens=128,
                routing_floor_score=5.5,
                lookup_timeout_ms=25,
                affinity_routing=False,
                strategy=index_policy.StrategyGates(
                    enable_chain_matching=False, require_chain=True, enable_tenant_hot=False
                ),
            ),
            id="every-field",
        ),
        pytest.param(
            {"minimumMatchedTokens": 0, "routingFloorScore": "0", "affinityRouting": "Enabled"},
            index_policy.NamespacePolicy(namespace="a", minimum_matched_tokens=0, routing_floor_score=0.0),
            id="explicit-zero-opt-outs",
        ),
    ],
)
def test_policy_payload_round_trips_through_the_server_decoder(
    spec: dict[str, Any], expected: index_policy.NamespacePolicy
) -> None:
    policy = cpol("a", **spec)
    assert cv.validate(policy, crds.cache_policy()) == []
    payload = cp.policy_payload([policy], [])
    assert payload["version"] == 7
    snap = decode(payload)
    assert snap.policies == (expected,)
    assert snap.tenants == ()


def test_policy_payload_first_per_namespace_and_tenant_dedup() -> None:
    policies = [cpol("b", "z", eviction="LFU"), cpol("b", "a"), cpol("a", "only", lookupTimeoutMs=7)]
    tenants = [
        ctenant("ns2", "t", "team", 10),
        ctenant("ns1", "t", "team", 20),  # (ns1, t) sorts first: wins
        ctenant("ns1", "noquota", "free"),  # no quota: not sent
        ctenant("ns1", "empty", "", 5),  # no tenant id: not sent
        ctenant("ns3", "t", "other", 0),
    ]
    payload = cp.policy_payload(policies, tenants)
    snap = decode(payload)
    assert [(p.namespace, p.eviction, p.lookup_timeout_ms) for p in snap.policies] == [
        ("a", "lru", 7),
        ("b", "lru", 0),
    ]
    assert snap.tenants == (
        index_policy.TenantQuota("other", 0, "Fairness"),
        index_policy.TenantQuota("team", 20, "Fairness"),
    )


def test_empty_policy_payload() -> None:
    payload = cp.policy_payload([], [])
    assert payload == {"version": 7, "policies": []}
    assert decode(payload) == policy_wire.PolicySnapshot(7, (), ())


@pytest.mark.parametrize(
    ("last", "payload", "now", "due"),
    [
        pytest.param(None, {"v": 1}, 0.0, True, id="first"),
        pytest.param(cp.PushRecord({"v": 1}, 100.0), {"v": 1}, 110.0, False, id="unchanged-recent"),
        pytest.param(cp.PushRecord({"v": 1}, 100.0), {"v": 2}, 101.0, True, id="changed"),
        pytest.param(cp.PushRecord({"v": 1}, 100.0), {"v": 1}, 130.0, True, id="re-push-after-30s"),
    ],
)
def test_push_due(last: cp.PushRecord | None, payload: dict[str, Any], now: float, due: bool) -> None:
    assert cp.push_due(payload, last, now) is due


# -- /snapshot ---------------------------------------------------------------------------


def pod(namespace: str, name: str, ip: str, phase: str = "Running", **labels: str) -> dict[str, Any]:
    annotations = {}
    if "injected" in labels:
        annotations["inferencecache.io/injected-by"] = labels.pop("injected")
    return {
        "metadata": {"namespace": namespace, "name": name, "labels": labels, "annotations": annotations},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def backend(namespace: str, name: str, selector: dict[str, str] | None, **status: Any) -> dict[str, Any]:
    spec = {"engineSelector": {"matchLabels": selector}} if selector is not None else {}
    return {"kind": "CacheBackend", "metadata": meta(namespace, name), "spec": spec, "status": status}


def filled_snapshot() -> dict[str, Any]:
    """A real index: two engines in ``llm`` (one with stats), one in ``team``, one prefix-only."""
    index = store.Index(clock=lambda: T0)
    scope_llm = types.Scope("llm", "m", "vllm")
    index.set_stats(
        tenant="llm", model="m", replica_id="10.0.0.7:8000", stats=types.ReplicaStats(100, 0.78, 0.25), ts=T0
    )
    index.blocks_stored(scope_llm, "10.0.0.7:8000", [b"a", b"b", b"c"], [16, 32, 48], T0 + 500)
    index.blocks_stored(scope_llm, "10.0.0.8:8000", [b"a"], [16], T0 + 600)
    index.set_stats(
        tenant="team",
        model="m",
        replica_id="10.0.1.1:8001",
        stats=types.ReplicaStats(50, 1e-7, 0.5),
        ts=T0 + 1,
    )
    index.blocks_stored(types.Scope("team", "m", "vllm"), "10.0.1.1:8001", [b"x"], [16], T0 + 700)
    body: dict[str, Any] = json.loads(snapshot.encode_json(index.snapshot()))
    return body


PODS = [
    pod("llm", "vllm-0", "10.0.0.7", app="vllm"),
    pod("llm", "vllm-1", "10.0.0.8", app="vllm", injected="llm/second"),
    pod("llm", "old", "10.0.0.8", phase="Succeeded", app="vllm"),
    pod("team", "engine", "10.0.1.1", app="vllm"),
]


def test_cacheindex_status_from_a_real_snapshot() -> None:
    status = cp.cacheindex_status(filled_snapshot(), NOW, server_url="http://s:8081/snapshot")
    assert status == {
        "replicas": [
            {
                "id": "10.0.0.7:8000",
                "tenant": "llm",
                "cacheMemoryBytes": 100,
                "hitRate": "0.78",
                "pressure": "0.25",
                "lastUpdate": "2023-11-14T22:13:20Z",
            },
            {
                "id": "10.0.1.1:8001",
                "tenant": "team",
                "cacheMemoryBytes": 50,
                "hitRate": "0.0000001",
                "pressure": "0.5",
                "lastUpdate": "2023-11-14T22:13:21Z",
            },
        ],
        "tenants": [
            {"id": "llm", "indexEntries": 3, "memoryUsed": 100, "hitRate": "0.78"},
            {"id": "team", "indexEntries": 1, "memoryUsed": 50, "hitRate": "0.0000001"},
        ],
        "prefixes": {"summary": {"total": 4, "hot": 0}},
        "observedServer": "http://s:8081/snapshot",
        "lastUpdated": "2023-11-14T23:00:00Z",
    }
    cacheindex = {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheIndex",
        "metadata": {"name": cp.CACHE_INDEX_NAME},
        "spec": {},
        "status": status,
    }
    assert cv.validate(cacheindex, crds.cache_index()) == []


def test_cacheindex_status_unchanged_keeps_previous() -> None:
    first = cp.cacheindex_status(filled_snapshot(), NOW)
    later = NOW + dt.timedelta(minutes=1)
    assert cp.cacheindex_status(filled_snapshot(), later, previous=first) == first
    # A newer stats report with the same values changes only replicas[].lastUpdate: no write.
    index = store.Index(clock=lambda: T0)
    index.set_stats(
        tenant="t", model="m", replica_id="10.0.0.7:8000", stats=types.ReplicaStats(1, 0.5, 0.5), ts=T0
    )
    base = cp.cacheindex_status(json.loads(snapshot.encode_json(index.snapshot())), NOW)
    index.set_stats(
        tenant="t", model="m", replica_id="10.0.0.7:8000", stats=types.ReplicaStats(1, 0.5, 0.5), ts=T0 + 9
    )
    assert (
        cp.cacheindex_status(json.loads(snapshot.encode_json(index.snapshot())), later, previous=base) == base
    )
    changed = cp.cacheindex_status(filled_snapshot(), later, previous=first, server_url="http://other")
    assert changed["lastUpdated"] == "2023-11-14T23:01:00Z"


def test_cacheindex_status_empty_snapshot() -> None:
    body = json.loads(snapshot.encode_json(store.Index(clock=lambda: T0).snapshot()))
    status = cp.cacheindex_status(body, NOW)
    assert (status["replicas"], status["tenants"], status["prefixes"]) == (
        [],
        [],
        {"summary": {"total": 0, "hot": 0}},
    )


def test_duplicate_replica_id_keeps_greatest_tenant() -> None:
    index = store.Index(clock=lambda: T0)
    for tenant in ("b", "a"):
        index.set_stats(
            tenant=tenant, model="m", replica_id="10.0.0.7:8000", stats=types.ReplicaStats(1, 0.5, 0.5), ts=T0
        )
    status = cp.cacheindex_status(json.loads(snapshot.encode_json(index.snapshot())), NOW)
    assert [(r["id"], r["tenant"]) for r in status["replicas"]] == [("10.0.0.7:8000", "b")]


@pytest.mark.parametrize(
    ("backends", "patches"),
    [
        pytest.param(
            [
                backend("llm", "first", {"app": "vllm"}),
                backend("llm", "second", None),
                backend("team", "t", {"app": "vllm"}),
            ],
            {
                ("llm", "first"): {
                    "indexParticipation": {"prefixCount": 3, "lastEventAt": "2023-11-14T22:21:40Z"}
                },
                ("llm", "second"): {
                    "indexParticipation": {"prefixCount": 1, "lastEventAt": "2023-11-14T22:23:20Z"}
                },
                ("team", "t"): {
                    "indexParticipation": {"prefixCount": 1, "lastEventAt": "2023-11-14T22:25:00Z"}
                },
            },
            id="selector-and-injected-by",
        ),
        pytest.param(
            [backend("llm", "a", {"app": "vllm"}), backend("llm", "b", {"app": "vllm"})],
            {
                ("llm", "a"): {
                    "indexParticipation": {"prefixCount": 3, "lastEventAt": "2023-11-14T22:21:40Z"}
                },
                ("llm", "b"): {"indexParticipation": {"prefixCount": 0, "lastEventAt": None}},
            },
            id="first-by-name-wins-and-annotated-backend-missing",
        ),
        pytest.param(
            [
                backend(
                    "llm",
                    "first",
                    {"app": "vllm"},
                    indexParticipation={"prefixCount": 3, "lastEventAt": "2023-11-14T22:21:40Z"},
                )
            ],
            {},
            id="unchanged-no-patch",
        ),
        pytest.param([backend("llm", "noselector", None)], {}, id="never-participated-no-selector"),
        pytest.param(
            [backend("llm", "gone", None, indexParticipation={"prefixCount": 9})],
            {("llm", "gone"): {"indexParticipation": {"prefixCount": 0, "lastEventAt": None}}},
            id="participated-before",
        ),
    ],
)
def test_backend_participation(backends: list[dict[str, Any]], patches: dict[tuple[str, str], Any]) -> None:
    assert cp.backend_participation(filled_snapshot(), PODS, backends) == patches


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        pytest.param({"replicaId": "10.0.0.7:8000", "tenant": "llm"}, "vllm-0", id="ip-and-namespace"),
        pytest.param({"replicaId": "10.0.0.7:8000", "tenant": "team"}, None, id="namespace-mismatch"),
        pytest.param({"replicaId": "10.0.0.7:8000"}, "vllm-0", id="untenanted"),
        pytest.param({"replicaId": "10.0.0.8:8000", "tenant": "llm"}, "vllm-1", id="finished-pod-skipped"),
        pytest.param({"replicaId": "[fd00::1]:8000", "tenant": "v6"}, "six", id="ipv6"),
        pytest.param({"replicaId": "vllm-0", "tenant": "llm"}, None, id="name-ids-do-not-match"),
    ],
)
def test_attribute_pod(row: dict[str, Any], expected: str | None) -> None:
    pods = [PODS[2], *PODS, pod("v6", "six", "fd00::1")]
    found = cp.attribute_pod(row, pods)
    assert (found["metadata"]["name"] if found else None) == expected


def test_tenant_statuses() -> None:
    tenants = [
        ctenant("llm", "main", "llm", 2),
        ctenant("other", "dup", "llm", 100),
        ctenant("team", "t", "team", 5),
        ctenant("x", "free", "nobody"),
    ]
    out = cp.tenant_statuses(filled_snapshot(), tenants, NOW)

    def summary(key: tuple[str, str]) -> tuple[int, list[tuple[str, str, str]]]:
        st = out[key]
        return st["indexEntries"], [(c["type"], c["status"], c["reason"]) for c in st["conditions"]]

    assert summary(("llm", "main")) == (
        3,
        [("Ready", "True", "Observed"), ("QuotaExceeded", "True", "OverEntryBudget")],
    )
    assert out[("llm", "main")]["conditions"][1]["message"] == "index entries 3 exceed budget 2"
    assert summary(("other", "dup")) == (
        3,
        [("Ready", "False", "DuplicateTenantID"), ("QuotaExceeded", "False", "NotEffective")],
    )
    assert summary(("team", "t")) == (
        1,
        [("Ready", "True", "Observed"), ("QuotaExceeded", "False", "WithinBudget")],
    )
    assert summary(("x", "free")) == (
        0,
        [("Ready", "True", "Observed"), ("QuotaExceeded", "False", "NoQuota")],
    )
    assert out[("llm", "main")]["observedGeneration"] == 1
    for cr in tenants:
        key = (cr["metadata"]["namespace"], cr["metadata"]["name"])
        obj = {**cr, "apiVersion": "inferencecache.io/v1alpha1", "status": out[key]}
        assert cv.validate(obj, crds.cache_tenant()) == []
    # Re-projection with the written status is identical (the handler then skips the patch).
    again = cp.tenant_statuses(
        filled_snapshot(),
        [ctenant("llm", "main", "llm", 2, **out[("llm", "main")])],
        NOW + dt.timedelta(minutes=5),
    )
    assert again[("llm", "main")] == out[("llm", "main")]


@pytest.mark.parametrize(
    ("value", "text"), [(0.78, "0.78"), (1e-7, "0.0000001"), (1.0, "1"), (0.0, "0"), (1 / 3, "0.33333334")]
)
def test_rate_format(value: float, text: str) -> None:
    assert cp.rate(value) == text
