"""The CRD validator (tests/operator/crd_validate.py) on the pinned upstream CRDs: valid
objects pass, broken CEL rules fail with the rule's message, structural checks catch unknown
fields, bad enums and int32 overflow, and every upstream rule is either evaluable or listed."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from . import crd_validate as cv

UPSTREAM = {kind: cv.load_crd(path) for (_, kind), path in cv.UPSTREAM_CRDS.items()}

POOL: dict[str, Any] = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "llama", "namespace": "models"},
    "spec": {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "endpointPickerRef": {"name": "inference-cache", "port": {"number": 9002}, "failureMode": "FailOpen"},
    },
}
EEP: dict[str, Any] = {
    "apiVersion": "gateway.envoyproxy.io/v1alpha1",
    "kind": "EnvoyExtensionPolicy",
    "metadata": {"name": "llama", "namespace": "models"},
    "spec": {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llama"}],
        "extProc": [
            {
                "backendRefs": [{"name": "inference-cache", "port": 9002}],
                "processingMode": {"request": {"body": "Buffered"}},
                "messageTimeout": "60s",
                "failOpen": True,
                "metadata": {
                    "writableNamespaces": ["envoy.lb"],
                    "accessibleNamespaces": ["envoy.lb.subset_hint", "envoy.lb"],
                },
            }
        ],
    },
}
BTP: dict[str, Any] = {
    "apiVersion": "gateway.envoyproxy.io/v1alpha1",
    "kind": "BackendTrafficPolicy",
    "metadata": {"name": "llama", "namespace": "models"},
    "spec": {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llama"}],
        "loadBalancer": {
            "type": "LeastRequest",
            "endpointOverride": {"extractFrom": [{"header": "x-gateway-destination-endpoint"}]},
        },
    },
}
ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "llama", "namespace": "models"},
    "spec": {
        "parentRefs": [{"name": "gateway"}],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                "backendRefs": [{"name": "vllm", "port": 8000}],
            }
        ],
    },
}
VALID = {"InferencePool": POOL, "EnvoyExtensionPolicy": EEP, "BackendTrafficPolicy": BTP, "HTTPRoute": ROUTE}


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``obj`` with the dotted ``path`` (ints index lists) set to ``value``."""
    out = copy.deepcopy(obj)
    node: Any = out
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parents:
        node = node[part]
    node[last] = value
    return out


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_upstream_objects_pass(kind: str) -> None:
    assert cv.validate(VALID[kind], UPSTREAM[kind]) == []


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"),
    [
        (
            "InferencePool",
            "spec.targetPorts",
            [{"number": 8000}, {"number": 8000}],
            "port number must be unique",
        ),
        (
            "InferencePool",
            "spec.endpointPickerRef",
            {"name": "inference-cache"},
            "port is required when kind is 'Service' or unspecified",
        ),
        (
            "EnvoyExtensionPolicy",
            "spec.extProc.0.processingMode.request.body",
            "FullDuplexStreamed",
            "If FullDuplexStreamed body processing mode is used, FailOpen must be false.",
        ),
        (
            "BackendTrafficPolicy",
            "spec.loadBalancer.type",
            "ConsistentHash",
            "If LoadBalancer type is consistentHash, consistentHash field needs to be set.",
        ),
        (
            "BackendTrafficPolicy",
            "spec.targetRefs.0.kind",
            "Service",
            "this policy can only have a targetRefs[*].kind of",
        ),
        ("HTTPRoute", "spec.rules.0.matches.0.path.value", "/v1//x", "must not contain '//'"),
    ],
)
def test_broken_cel_rule_reports_its_message(kind: str, path: str, value: Any, message: str) -> None:
    errors = cv.validate(_with(VALID[kind], path, value), UPSTREAM[kind])
    assert any(message in e for e in errors), errors


def test_failopen_false_with_full_duplex_passes() -> None:
    obj = _with(EEP, "spec.extProc.0.processingMode.request.body", "FullDuplexStreamed")
    assert cv.validate(_with(obj, "spec.extProc.0.failOpen", False), UPSTREAM["EnvoyExtensionPolicy"]) == []


def test_rule_with_escaped_property_name_is_evaluated() -> None:
    # HTTPRoute parentRefs uniqueness reads p1.__namespace__ (the escaped `namespace`).
    refs = [{"name": "gateway", "namespace": "infra"}, {"name": "gateway", "namespace": "infra"}]
    errors = cv.validate(_with(ROUTE, "spec.parentRefs", refs), UPSTREAM["HTTPRoute"])
    assert any("sectionName must be unique when parentRefs includes 2 or more" in e for e in errors), errors
    other = [{"name": "gateway", "namespace": "infra"}, {"name": "gateway", "namespace": "edge"}]
    assert cv.validate(_with(ROUTE, "spec.parentRefs", other), UPSTREAM["HTTPRoute"]) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.bogus", 1, "Additional properties are not allowed ('bogus' was unexpected)"),
        ("spec.endpointPickerRef.failureMode", "Sometimes", "'Sometimes' is not one of"),
        ("spec.targetPorts", [{"number": 2**31}], "is not a 'int32'"),
        ("spec.targetPorts", [], "should be non-empty"),
    ],
)
def test_structural_errors(path: str, value: Any, message: str) -> None:
    errors = cv.validate(_with(POOL, path, value), UPSTREAM["InferencePool"])
    assert any(message in e for e in errors), errors


def test_metadata_stays_open_and_kind_and_version_are_checked() -> None:
    crd = UPSTREAM["InferencePool"]
    labelled = _with(POOL, "metadata.labels", {"app": "x"})
    assert cv.validate(labelled, crd) == []
    assert cv.validate(_with(POOL, "kind", "InferenceModel"), crd) == [
        "kind: expected 'InferencePool', got 'InferenceModel'"
    ]
    assert cv.validate(_with(POOL, "apiVersion", "inference.networking.k8s.io/v9"), crd)
    assert cv.validate(_with(POOL, "apiVersion", "apps/v1"), crd)


def test_defaults_are_applied_before_validation() -> None:
    # HTTPRoute: a rule without matches is defaulted to a PathPrefix "/" match.
    route = _with(ROUTE, "spec.rules.0", {"backendRefs": [{"name": "vllm", "port": 8000}]})
    stored = cv.defaulted(route, UPSTREAM["HTTPRoute"])
    assert stored["spec"]["rules"][0]["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert cv.validate(route, UPSTREAM["HTTPRoute"]) == []


@pytest.mark.parametrize("kind", sorted(UPSTREAM))
def test_every_upstream_rule_is_evaluable_or_listed(kind: str) -> None:
    crd = UPSTREAM[kind]
    name = crd["metadata"]["name"]
    unevaluable = cv.unevaluable_rules(crd)
    listed = {rule for (crd_name, rule) in cv.UNEVALUATED_RULES if crd_name == name}
    assert set(unevaluable) == listed


def test_unlisted_unevaluable_rule_raises() -> None:
    crd = copy.deepcopy(UPSTREAM["InferencePool"])
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["x-kubernetes-validations"] = [{"rule": "quantity('1Gi').isGreaterThan(quantity('1Mi'))"}]
    with pytest.raises(cv.UnevaluableRuleError, match="quantity"):
        cv.validate(POOL, crd)


def test_list_map_keys_and_set_items_must_be_unique() -> None:
    crd = copy.deepcopy(UPSTREAM["InferencePool"])
    ports = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    ports = ports["targetPorts"]
    del ports["x-kubernetes-validations"]
    ports.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["number"]})
    twice = _with(POOL, "spec.targetPorts", [{"number": 8000}, {"number": 8000}])
    assert cv.validate(twice, crd) == ["spec.targetPorts[1]: Duplicate value: [8000]"]
    assert cv.validate(POOL, crd) == []
    ports["x-kubernetes-list-type"] = "set"
    assert cv.validate(twice, crd) == ['spec.targetPorts[1]: Duplicate value: {"number": 8000}']


def test_crd_for_finds_upstream_kinds() -> None:
    found = cv.crd_for(POOL)
    assert found is not None and found["spec"]["names"]["kind"] == "InferencePool"
    assert cv.crd_for({"apiVersion": "v1", "kind": "Pod"}) is None
