"""Gateway objects per CacheBackend (``inference_cache.operator.gateway``).

We test: which objects each ``spec.gateway`` mode and option yields and what lands in
``status.gateway`` (emitted/skipped with reasons, never an exception), the fields that
carry our contract (endpoint picker, body mode, fail-open rules, metadata namespaces,
endpoint override header, owner references, labels), and that every emitted object, and
HTTPRoutes that use them, pass the upstream CRDs (structural schema + CEL, through
``crd_validate``) the way a kube-apiserver would admit them. Nothing is mocked: the
functions are pure.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest

from inference_cache.operator import gateway as gw

from . import crd_validate as cv

CRDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "crds"
POOL_CRD = CRDS / "gaie" / "inference.networking.k8s.io_inferencepools.v1.main.yaml"
POOL_CRD_V1_0 = CRDS / "gaie" / "inference.networking.k8s.io_inferencepools.v1.v1.0.0.yaml"
EEP_CRD = CRDS / "envoy-gateway" / "gateway.envoyproxy.io_envoyextensionpolicies.main.yaml"
BTP_CRD = CRDS / "envoy-gateway" / "gateway.envoyproxy.io_backendtrafficpolicies.main.yaml"
HTTPROUTE_CRD = CRDS / "gateway-api" / "gateway.networking.k8s.io_httproutes.standard.v1.6.1.yaml"

SETTINGS = gw.GatewaySettings(service_name="inference-cache", service_namespace="llm")
OTHER_NS = gw.GatewaySettings(service_name="inference-cache", service_namespace="inference-cache-system")
ALL_CRDS = frozenset({gw.INFERENCE_POOL_CRD, gw.ENVOY_EXTENSION_POLICY_CRD, gw.BACKEND_TRAFFIC_POLICY_CRD})
UID = "6f1c0d3e-8f9a-4c1e-9c55-0b5a3f2d7e11"


def backend(gateway: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "metadata": {"name": "qwen", "namespace": "llm", "uid": UID, "generation": 3},
        "spec": {"type": "None", "engineSelector": {"matchLabels": {"app": "vllm"}}, **spec},
    }
    if gateway is not None:
        body["spec"]["gateway"] = gateway
    return body


POOL = {"mode": "InferencePool", "modelName": "Qwen/Qwen3-0.6B", "targetPorts": [8000]}
EG = {"mode": "EnvoyGateway", "modelName": "Qwen/Qwen3-0.6B", "httpRouteRef": {"name": "llm"}}


def kinds(entries: list[Any]) -> list[str]:
    return [entry["kind"] for entry in entries]


@pytest.mark.parametrize(
    ("cr", "settings", "available", "emitted", "skipped"),
    [
        pytest.param(backend(), SETTINGS, ALL_CRDS, [], [], id="no-gateway"),
        pytest.param(backend({"mode": "None"}), SETTINGS, ALL_CRDS, [], [], id="mode-none"),
        pytest.param(backend(POOL), SETTINGS, ALL_CRDS, ["InferencePool"], [], id="pool"),
        pytest.param(
            backend(POOL),
            SETTINGS,
            ALL_CRDS - {gw.INFERENCE_POOL_CRD},
            [],
            ["InferencePool"],
            id="pool-no-crd",
        ),
        pytest.param(
            backend(
                POOL,
                engineSelector={
                    "matchLabels": {"app": "vllm"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["gpu"]}],
                },
            ),
            SETTINGS,
            ALL_CRDS,
            [],
            ["InferencePool"],
            id="pool-match-expressions",
        ),
        pytest.param(
            backend(POOL, engineSelector={}), SETTINGS, ALL_CRDS, [], ["InferencePool"], id="pool-no-labels"
        ),
        pytest.param(
            backend({**POOL, "targetPorts": []}),
            SETTINGS,
            ALL_CRDS,
            [],
            ["InferencePool"],
            id="pool-no-ports",
        ),
        pytest.param(
            backend({**POOL, "targetPorts": [8000, 8000]}),
            SETTINGS,
            ALL_CRDS,
            [],
            ["InferencePool"],
            id="pool-duplicate-ports",
        ),
        pytest.param(
            backend({**POOL, "targetPorts": list(range(8000, 8009))}),
            SETTINGS,
            ALL_CRDS,
            [],
            ["InferencePool"],
            id="pool-nine-ports",
        ),
        pytest.param(
            backend(POOL), OTHER_NS, ALL_CRDS, [], ["InferencePool"], id="pool-picker-other-namespace"
        ),
        pytest.param(
            backend(EG), SETTINGS, ALL_CRDS, ["EnvoyExtensionPolicy", "BackendTrafficPolicy"], [], id="eg"
        ),
        pytest.param(
            backend(EG),
            OTHER_NS,
            ALL_CRDS,
            ["EnvoyExtensionPolicy", "BackendTrafficPolicy"],
            ["ReferenceGrant"],
            id="eg-server-other-namespace",
        ),
        pytest.param(
            backend(EG),
            SETTINGS,
            frozenset({gw.INFERENCE_POOL_CRD}),
            [],
            ["EnvoyExtensionPolicy", "BackendTrafficPolicy"],
            id="eg-no-crds",
        ),
        pytest.param(
            backend(EG),
            SETTINGS,
            ALL_CRDS - {gw.BACKEND_TRAFFIC_POLICY_CRD},
            ["EnvoyExtensionPolicy"],
            ["BackendTrafficPolicy"],
            id="eg-no-btp-crd",
        ),
        pytest.param(
            backend({**EG, "httpRouteRef": None}),
            SETTINGS,
            ALL_CRDS,
            [],
            ["EnvoyExtensionPolicy", "BackendTrafficPolicy"],
            id="eg-no-route",
        ),
        pytest.param(
            backend({**EG, "messageTimeout": "1 minute"}),
            SETTINGS,
            ALL_CRDS,
            ["BackendTrafficPolicy"],
            ["EnvoyExtensionPolicy"],
            id="eg-bad-timeout",
        ),
        pytest.param(
            backend(EG),
            SETTINGS,
            frozenset(),
            [],
            ["EnvoyExtensionPolicy", "BackendTrafficPolicy"],
            id="eg-empty-cluster",
        ),
    ],
)
def test_modes_emit_and_skip(
    cr: dict[str, Any],
    settings: gw.GatewaySettings,
    available: frozenset[str],
    emitted: list[str],
    skipped: list[str],
) -> None:
    plan = gw.desired_gateway_objects(cr, settings, available)
    assert kinds(plan.emitted) == emitted
    assert kinds(plan.objects) == emitted
    assert [entry["name"] for entry in plan.emitted] == ["qwen"] * len(emitted)
    assert kinds(plan.skipped) == skipped
    assert all(entry["reason"] for entry in plan.skipped)


@pytest.mark.parametrize(
    ("cr", "available", "fragment"),
    [
        pytest.param(backend(POOL), frozenset(), gw.INFERENCE_POOL_CRD, id="crd"),
        pytest.param(
            backend(POOL, engineSelector={"matchExpressions": [{"key": "a", "operator": "Exists"}]}),
            ALL_CRDS,
            "matchExpressions",
            id="expressions",
        ),
        pytest.param(backend({**EG, "httpRouteRef": {}}), ALL_CRDS, "httpRouteRef", id="route"),
        pytest.param(backend({**EG, "messageTimeout": "soon"}), ALL_CRDS, "'soon'", id="timeout"),
    ],
)
def test_skip_reasons_name_the_cause(cr: dict[str, Any], available: frozenset[str], fragment: str) -> None:
    plan = gw.desired_gateway_objects(cr, SETTINGS, available)
    assert plan.skipped
    assert fragment in plan.skipped[0]["reason"]


def test_modes_never_share_a_route() -> None:
    pool = gw.desired_gateway_objects(backend({**POOL, "httpRouteRef": {"name": "llm"}}), SETTINGS, ALL_CRDS)
    eg = gw.desired_gateway_objects(backend({**EG, "targetPorts": [8000]}), SETTINGS, ALL_CRDS)
    assert kinds(pool.objects) == ["InferencePool"]
    assert "InferencePool" not in kinds(eg.objects)


@pytest.mark.parametrize(
    ("fail_open", "mode"),
    [pytest.param(None, "FailOpen", id="default"), (True, "FailOpen"), (False, "FailClose")],
)
def test_inference_pool(fail_open: bool | None, mode: str) -> None:
    spec = {**POOL, "targetPorts": [8000, {"number": 8001}]}
    if fail_open is not None:
        spec["failOpen"] = fail_open
    (pool,) = gw.desired_gateway_objects(
        backend(spec, engineSelector={"matchLabels": {"app": "vllm", "model": "qwen"}}), SETTINGS, ALL_CRDS
    ).objects
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["namespace"] == "llm"
    assert pool["spec"] == {
        "selector": {"matchLabels": {"app": "vllm", "model": "qwen"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "endpointPickerRef": {
            "group": "",
            "kind": "Service",
            "name": "inference-cache",
            "port": {"number": 9002},
            "failureMode": mode,
        },
    }


def eep_ext_proc(gateway: dict[str, Any], settings: gw.GatewaySettings = SETTINGS) -> dict[str, Any]:
    plan = gw.desired_gateway_objects(backend(gateway), settings, ALL_CRDS)
    (policy,) = (obj for obj in plan.objects if obj["kind"] == "EnvoyExtensionPolicy")
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llm"}
    ]
    (ext_proc,) = policy["spec"]["extProc"]
    return dict(ext_proc)


@pytest.mark.parametrize(
    ("options", "processing_mode", "fail_open"),
    [
        pytest.param({}, {"request": {"body": "Buffered"}}, True, id="defaults"),
        pytest.param(
            {"bodyMode": "Buffered", "failOpen": False},
            {"request": {"body": "Buffered"}},
            None,
            id="buffered-fail-closed",
        ),
        pytest.param(
            {"bodyMode": "FullDuplexStreamed", "failOpen": False},
            {"request": {"body": "FullDuplexStreamed"}},
            None,
            id="full-duplex",
        ),
        # The CRD forbids failOpen with FullDuplexStreamed: the policy stays fail-closed.
        pytest.param(
            {"bodyMode": "FullDuplexStreamed"},
            {"request": {"body": "FullDuplexStreamed"}},
            None,
            id="full-duplex-default-fail-open",
        ),
        pytest.param(
            {"responseProcessing": True},
            {"request": {"body": "Buffered"}, "response": {}},
            True,
            id="response-processing",
        ),
        pytest.param(
            {"responseProcessing": False},
            {"request": {"body": "Buffered"}},
            True,
            id="no-response-processing",
        ),
    ],
)
def test_extension_policy_options(
    options: dict[str, Any], processing_mode: dict[str, Any], fail_open: bool | None
) -> None:
    ext_proc = eep_ext_proc({**EG, **options})
    assert ext_proc["processingMode"] == processing_mode
    assert ext_proc.get("failOpen") is fail_open
    assert ext_proc["messageTimeout"] == "60s"
    assert ext_proc["backendRefs"] == [
        {"group": "", "kind": "Service", "name": "inference-cache", "port": 9002}
    ]
    assert ext_proc["metadata"] == {
        "writableNamespaces": ["envoy.lb"],
        "accessibleNamespaces": ["envoy.lb.subset_hint", "envoy.lb"],
    }


def test_extension_policy_timeout_and_remote_service() -> None:
    settings = gw.GatewaySettings(
        service_name="ic", service_namespace="inference-cache-system", extproc_port=19002
    )
    ext_proc = eep_ext_proc({**EG, "messageTimeout": "1m30s"}, settings)
    assert ext_proc["messageTimeout"] == "1m30s"
    assert ext_proc["backendRefs"] == [
        {"group": "", "kind": "Service", "name": "ic", "namespace": "inference-cache-system", "port": 19002}
    ]


def test_backend_traffic_policy_overrides_the_endpoint() -> None:
    plan = gw.desired_gateway_objects(backend(EG), SETTINGS, ALL_CRDS)
    (policy,) = (obj for obj in plan.objects if obj["kind"] == "BackendTrafficPolicy")
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert policy["spec"] == {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llm"}],
        "loadBalancer": {
            "type": "LeastRequest",
            "endpointOverride": {"extractFrom": [{"header": "x-gateway-destination-endpoint"}]},
        },
    }


@pytest.mark.parametrize("gateway", [pytest.param(POOL, id="pool"), pytest.param(EG, id="eg")])
def test_objects_are_owned_and_labelled(gateway: dict[str, Any]) -> None:
    plan = gw.desired_gateway_objects(backend(gateway), SETTINGS, ALL_CRDS)
    assert plan.objects
    for obj in plan.objects:
        meta = obj["metadata"]
        assert (meta["name"], meta["namespace"]) == ("qwen", "llm")
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "inferencecache.io/v1alpha1",
                "kind": "CacheBackend",
                "name": "qwen",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"] == {
            "app.kubernetes.io/name": "cachebackend",
            "app.kubernetes.io/instance": "qwen",
            "app.kubernetes.io/component": "gateway",
            "app.kubernetes.io/managed-by": "inference-cache-controller",
        }


def test_input_is_not_mutated_and_output_is_not_shared() -> None:
    cr = backend({**POOL, "failOpen": False})
    before = copy.deepcopy(cr)
    plan = gw.desired_gateway_objects(cr, SETTINGS, ALL_CRDS)
    plan.objects[0]["spec"]["selector"]["matchLabels"]["extra"] = "x"
    assert cr == before


# ---- the objects against the upstream CRDs -------------------------------------------------


@functools.cache
def crd(path: Path) -> dict[str, Any]:
    return cv.load_crd(path)


#: The CRDs each emitted kind must pass: the InferencePool both Inference Extension main
#: (v1.6+) and v1.0.0, the first v1 release that gateways may still ship.
SCHEMAS = {
    "InferencePool": (POOL_CRD, POOL_CRD_V1_0),
    "EnvoyExtensionPolicy": (EEP_CRD,),
    "BackendTrafficPolicy": (BTP_CRD,),
}

VALIDATED = [
    pytest.param(POOL, SETTINGS, id="pool"),
    pytest.param({**POOL, "failOpen": False}, SETTINGS, id="pool-fail-close"),
    pytest.param(EG, SETTINGS, id="eg"),
    pytest.param(EG, OTHER_NS, id="eg-server-other-namespace"),
    pytest.param({**EG, "failOpen": False}, SETTINGS, id="eg-fail-closed"),
    pytest.param({**EG, "responseProcessing": True, "messageTimeout": "1m30s"}, SETTINGS, id="eg-response"),
    pytest.param({**EG, "bodyMode": "FullDuplexStreamed", "failOpen": False}, SETTINGS, id="eg-full-duplex"),
    pytest.param(
        {**EG, "bodyMode": "FullDuplexStreamed", "responseProcessing": True},
        SETTINGS,
        id="eg-full-duplex-default-fail-open",
    ),
]


@pytest.mark.parametrize(("gateway", "settings"), VALIDATED)
def test_emitted_objects_pass_the_upstream_crds(
    gateway: dict[str, Any], settings: gw.GatewaySettings
) -> None:
    plan = gw.desired_gateway_objects(backend(gateway), settings, ALL_CRDS)
    assert plan.objects
    for obj in plan.objects:
        for path in SCHEMAS[obj["kind"]]:
            assert cv.validate(obj, crd(path)) == [], f"{obj['kind']} vs {path.name}"


def test_several_target_ports_need_a_pool_newer_than_v1_0() -> None:
    (pool,) = gw.desired_gateway_objects(
        backend({**POOL, "targetPorts": list(range(8000, 8008))}), SETTINGS, ALL_CRDS
    ).objects
    assert cv.validate(pool, crd(POOL_CRD)) == []
    assert any("targetPorts" in error for error in cv.validate(pool, crd(POOL_CRD_V1_0)))


def test_the_crd_would_reject_fail_open_with_full_duplex() -> None:
    """Why ``failOpen`` is left out with FullDuplexStreamed: the CEL rule the CRD carries."""
    plan = gw.desired_gateway_objects(backend({**EG, "bodyMode": "FullDuplexStreamed"}), SETTINGS, ALL_CRDS)
    (policy,) = (obj for obj in plan.objects if obj["kind"] == "EnvoyExtensionPolicy")
    assert cv.validate(policy, crd(EEP_CRD)) == []
    forced = copy.deepcopy(policy)
    forced["spec"]["extProc"][0]["failOpen"] = True
    assert cv.validate(forced, crd(EEP_CRD)) == [
        "spec.extProc[0]: If FullDuplexStreamed body processing mode is used, FailOpen must be false."
    ]


def httproute(backend_ref: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llm", "namespace": "llm"},
        "spec": {
            "parentRefs": [{"name": "inference-gateway"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1/"}}],
                    "backendRefs": [backend_ref],
                }
            ],
        },
    }


def test_an_httproute_can_use_the_pool() -> None:
    (pool,) = gw.desired_gateway_objects(backend(POOL), SETTINGS, ALL_CRDS).objects
    group = pool["apiVersion"].partition("/")[0]
    route = httproute({"group": group, "kind": pool["kind"], "name": pool["metadata"]["name"]})
    assert cv.validate(route, crd(HTTPROUTE_CRD)) == []


def test_the_policies_target_an_httproute_that_validates() -> None:
    plan = gw.desired_gateway_objects(backend(EG), SETTINGS, ALL_CRDS)
    route = httproute({"name": "vllm", "port": 8000})
    assert cv.validate(route, crd(HTTPROUTE_CRD)) == []
    for policy in plan.objects:
        assert policy["spec"]["targetRefs"] == [
            {"group": "gateway.networking.k8s.io", "kind": route["kind"], "name": route["metadata"]["name"]}
        ]


def test_an_httproute_naming_a_service_without_port_fails() -> None:
    """The HTTPRoute check can fail: a Service backend without a port breaks a CEL rule."""
    assert cv.validate(httproute({"name": "vllm"}), crd(HTTPROUTE_CRD)) == [
        "spec.rules[0].backendRefs[0]: Must have port for Service reference"
    ]
