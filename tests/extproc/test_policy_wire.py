"""``extproc.policy_wire``: the ``/policy`` body decoder (v3-v7) and the v7 encoder.

Pure functions, nothing mocked. The bodies are the shapes in the original's
``docs/design/policy-propagation.md`` and its server tests.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from inference_cache.extproc import policy_wire
from inference_cache.index.policy import NamespacePolicy, StrategyGates, TenantQuota

DESIGN_DOC_V7 = {
    "version": 7,
    "policies": [
        {
            "namespace": "team-a",
            "evictionTTL": 900000000000,
            "minimumPrefixTokens": 32,
            "minimumMatchedTokens": 128,
            "routingFloorScore": 5,
            "lookupTimeoutMs": 25,
            "eviction": "lfu",
            "strategy": {"enableChainMatching": True, "requireChain": False, "enableTenantHot": True},
            "affinityRouting": True,
        },
        {
            "namespace": "team-b",
            "evictionTTL": 3600000000000,
            "minimumMatchedTokens": 64,
            "routingFloorScore": 0.1,
            "affinityRouting": False,
        },
    ],
    "tenants": [{"tenantID": "team-a", "maxIndexEntries": 100000, "isolationMode": "Fairness"}],
}


def _decode(body: dict[str, Any]) -> policy_wire.PolicySnapshot:
    return policy_wire.decode(json.dumps(body).encode())


def test_design_doc_v7_body() -> None:
    snap = _decode(DESIGN_DOC_V7)
    assert snap.version == 7
    assert snap.policies == (
        NamespacePolicy(
            namespace="team-a",
            eviction_ttl_s=900.0,
            minimum_prefix_tokens=32,
            minimum_matched_tokens=128,
            routing_floor_score=5.0,
            lookup_timeout_ms=25,
            affinity_routing=True,
            eviction="lfu",
            strategy=StrategyGates(True, False, True),
        ),
        NamespacePolicy(
            namespace="team-b",
            eviction_ttl_s=3600.0,
            minimum_matched_tokens=64,
            routing_floor_score=0.1,
            affinity_routing=False,
        ),
    )
    assert snap.tenants == (TenantQuota("team-a", 100000, "Fairness"),)


def test_v3_body_from_seed_is_normalised_to_the_defaults() -> None:
    snap = _decode(
        {
            "version": 3,
            "policies": [
                {
                    "namespace": "team-a",
                    "evictionTTL": 900000000000,
                    "minimumPrefixTokens": 32,
                    "lookupTimeoutMs": 25,
                    "eviction": "lfu",
                },
                {"namespace": "team-b", "evictionTTL": 3600000000000},
            ],
            "tenants": [{"tenantID": "team-a", "maxIndexEntries": 100000, "isolationMode": "Fairness"}],
        }
    )
    a, b = snap.policies
    assert (a.minimum_matched_tokens, a.routing_floor_score, a.affinity_routing) == (64, 0.1, True)
    assert a.strategy == StrategyGates(
        enable_chain_matching=True, require_chain=False, enable_tenant_hot=True
    )
    assert (a.eviction, a.lookup_timeout_ms, a.minimum_prefix_tokens) == ("lfu", 25, 32)
    assert (b.eviction, b.ttl_s, b.minimum_matched_tokens) == ("lru", 3600.0, 64)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_missing_minimum_matched_tokens_is_the_opt_out_from_v4(version: int) -> None:
    snap = _decode({"version": version, "policies": [{"namespace": "ns"}]})
    assert snap.policies[0].minimum_matched_tokens == 0


def test_v3_keeps_an_explicit_minimum_matched_tokens() -> None:
    snap = _decode({"version": 3, "policies": [{"namespace": "ns", "minimumMatchedTokens": 7}]})
    assert snap.policies[0].minimum_matched_tokens == 7


@pytest.mark.parametrize("version", [3, 4, 5, 6, 7])
def test_absent_pointer_fields_take_the_resolver_defaults(version: int) -> None:
    (p,) = _decode({"version": version, "policies": [{"namespace": "ns"}]}).policies
    assert (p.routing_floor_score, p.affinity_routing, p.strategy) == (
        0.1,
        True,
        policy_wire.DEFAULT_STRATEGY,
    )


def test_explicit_v7_opt_outs_reach_the_store_as_written() -> None:
    (p,) = _decode(
        {
            "version": 7,
            "policies": [
                {
                    "namespace": "ns",
                    "routingFloorScore": 0,
                    "affinityRouting": False,
                    "strategy": {"enableChainMatching": False, "enableTenantHot": False},
                }
            ],
        }
    ).policies
    assert (p.routing_floor_score, p.affinity_routing) == (0.0, False)
    assert p.strategy == StrategyGates(
        enable_chain_matching=False, require_chain=False, enable_tenant_hot=False
    )


def test_clamps_and_eviction_normalisation() -> None:
    (p,) = _decode(
        {
            "version": 7,
            "policies": [
                {"namespace": "ns", "minimumMatchedTokens": -5, "routingFloorScore": -1.5, "eviction": "LFU"}
            ],
        }
    ).policies
    assert (p.minimum_matched_tokens, p.routing_floor_score, p.eviction) == (0, 0.0, "lfu")
    (q,) = _decode({"version": 7, "policies": [{"namespace": "ns", "eviction": "fifo"}]}).policies
    assert q.eviction == "lru"


def test_nulls_and_missing_lists_are_absent() -> None:
    snap = _decode({"version": 7, "policies": None, "tenants": None})
    assert (snap.policies, snap.tenants) == ((), ())
    assert _decode({"version": 7}).policies == ()
    (t,) = _decode({"version": 7, "tenants": [{"tenantID": "t", "maxIndexEntries": 0}]}).tenants
    assert t == TenantQuota("t", 0, "Fairness")


@pytest.mark.parametrize("version", [0, 1, 2, 8, 99, -3])
def test_versions_outside_3_to_7_are_unsupported(version: int) -> None:
    with pytest.raises(
        policy_wire.UnsupportedPolicyVersionError, match=r"^unsupported policy snapshot version$"
    ):
        _decode({"version": version, "policies": []})


def test_missing_version_is_unsupported() -> None:
    with pytest.raises(policy_wire.UnsupportedPolicyVersionError):
        _decode({"policies": []})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"version": 7, "extra": 1}, '"extra"', id="top-level"),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "ttl": 1}]}, '"ttl" in policies[0]', id="policy"
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "strategy": {"fast": True}}]},
            '"fast" in policies[0].strategy',
            id="strategy",
        ),
        pytest.param(
            {"version": 7, "tenants": [{"tenantID": "a", "maxIndexEntries": 1, "quota": 2}]},
            '"quota" in tenants[0]',
            id="tenant",
        ),
        pytest.param(
            {"version": 7, "policies": [{"Namespace": "a"}]},
            '"Namespace" in policies[0]',
            id="case-sensitive",
        ),
    ],
)
def test_unknown_fields_are_rejected_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(policy_wire.PolicyDecodeError, match=f"^{re.escape(f'unknown field {field}')}$"):
        _decode(body)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({"version": "7"}, "version: expected an integer", id="version-string"),
        pytest.param({"version": 7.0}, "version: expected an integer", id="version-float"),
        pytest.param({"version": 7, "policies": {}}, "policies: expected an array", id="policies-object"),
        pytest.param({"version": 7, "policies": [1]}, "policies[0]: expected an object", id="policy-number"),
        pytest.param(
            {"version": 7, "policies": [{"namespace": 1}]},
            "policies[0].namespace: expected a string",
            id="namespace-number",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "evictionTTL": "15m"}]},
            "policies[0].evictionTTL: expected an integer",
            id="ttl-string",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "minimumPrefixTokens": True}]},
            "policies[0].minimumPrefixTokens: expected an integer, got bool",
            id="bool-as-int",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "lookupTimeoutMs": 2**31}]},
            "policies[0].lookupTimeoutMs: integer 2147483648 out of range",
            id="int32-overflow",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "routingFloorScore": "0.1"}]},
            "policies[0].routingFloorScore: expected a number, got string",
            id="floor-string",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "routingFloorScore": 1e39}]},
            "policies[0].routingFloorScore: number 1e+39 out of float32 range",
            id="floor-overflow",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "affinityRouting": "Enabled"}]},
            "policies[0].affinityRouting: expected a bool, got string",
            id="affinity-string",
        ),
        pytest.param(
            {"version": 7, "policies": [{"namespace": "a", "strategy": {"requireChain": 1}}]},
            "policies[0].strategy.requireChain: expected a bool, got number",
            id="strategy-number",
        ),
        pytest.param(
            {"version": 7, "tenants": [{"tenantID": "a", "maxIndexEntries": 1.5}]},
            "tenants[0].maxIndexEntries: expected an integer, got number",
            id="quota-float",
        ),
        pytest.param([], ": expected an object, got array", id="root-array"),
    ],
)
def test_wrong_types_are_rejected(body: Any, where: str) -> None:
    with pytest.raises(policy_wire.PolicyDecodeError, match=f"^{re.escape(where)}"):
        _decode(body)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b'{"version": 7} {}', id="trailing"),
        pytest.param(b'{"version": 7, "policies": [{"namespace": "a", "routingFloorScore": NaN}]}', id="nan"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    ],
)
def test_malformed_json_is_a_decode_error(raw: bytes) -> None:
    with pytest.raises(policy_wire.PolicyDecodeError) as info:
        policy_wire.decode(raw)
    assert not isinstance(info.value, policy_wire.UnsupportedPolicyVersionError)


def test_encoder_writes_the_design_doc_shape() -> None:
    policies = [
        NamespacePolicy(
            namespace="team-b", eviction_ttl_s=3600.0, minimum_matched_tokens=64, affinity_routing=False
        ),
        NamespacePolicy(
            namespace="team-a",
            eviction_ttl_s=900.0,
            minimum_prefix_tokens=32,
            minimum_matched_tokens=128,
            routing_floor_score=5.0,
            lookup_timeout_ms=25,
            eviction="lfu",
        ),
    ]
    body = json.loads(policy_wire.encode(policies, [TenantQuota("team-a", 100000)]))
    assert body["version"] == 7
    assert [p["namespace"] for p in body["policies"]] == ["team-a", "team-b"]
    assert body["policies"][0] == {
        "namespace": "team-a",
        "evictionTTL": 900000000000,
        "minimumPrefixTokens": 32,
        "minimumMatchedTokens": 128,
        "routingFloorScore": 5.0,
        "lookupTimeoutMs": 25,
        "affinityRouting": True,
        "eviction": "lfu",
        "strategy": {"enableChainMatching": True, "requireChain": False, "enableTenantHot": True},
    }
    # omitempty scalars are dropped at zero, exactly as the Go struct tags do.
    assert "minimumPrefixTokens" not in body["policies"][1]
    assert "lookupTimeoutMs" not in body["policies"][1]
    assert body["tenants"] == [{"tenantID": "team-a", "maxIndexEntries": 100000, "isolationMode": "Fairness"}]
    assert "tenants" not in json.loads(policy_wire.encode(policies))


def test_round_trip() -> None:
    policies = (
        NamespacePolicy(namespace="a"),
        NamespacePolicy(
            namespace="b",
            eviction_ttl_s=0.25,
            minimum_prefix_tokens=1,
            minimum_matched_tokens=0,
            routing_floor_score=0.0,
            lookup_timeout_ms=3,
            affinity_routing=False,
            eviction="lfu",
            strategy=StrategyGates(enable_chain_matching=False, require_chain=True, enable_tenant_hot=False),
        ),
        NamespacePolicy(namespace="c", eviction_ttl_s=86400.0, minimum_matched_tokens=2**31 - 1),
    )
    tenants = (TenantQuota("t1", 0), TenantQuota("t2", 2**63 - 1, "Fairness"))
    snap = policy_wire.decode(policy_wire.encode(reversed(policies), reversed(tenants)))
    assert (snap.version, snap.policies, snap.tenants) == (7, policies, tenants)
