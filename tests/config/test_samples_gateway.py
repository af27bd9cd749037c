"""``config/samples/gateway/gateway_v1_httproute*.yaml``: the HTTPRoutes the routing-only
CacheBackend samples refer to validate against the upstream Gateway API HTTPRoute CRD (CEL
rules included), and each points where its CacheBackend sample expects.

Owner: tests of ``config/`` (issue #7).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ..operator import crd_validate
from . import manifests

SAMPLES = manifests.CONFIG / "samples"
ROUTES = {
    r["metadata"]["name"]: r
    for path in sorted((SAMPLES / "gateway").glob("gateway_v1_httproute*.yaml"))
    for r in manifests.parse(path.read_text())
}


def backend(mode: str) -> dict[str, Any]:
    (only,) = [
        doc
        for path in sorted(SAMPLES.glob("*.yaml"))
        for doc in manifests.parse(path.read_text())
        if doc["kind"] == "CacheBackend" and doc["spec"].get("gateway", {}).get("mode") == mode
    ]
    return only


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_route_validates_against_the_gateway_api_crd(name: str) -> None:
    route = ROUTES[name]
    crd = crd_validate.crd_for(route)
    assert crd is not None and crd["metadata"]["name"] == "httproutes.gateway.networking.k8s.io"
    assert crd_validate.validate(route, crd) == []


def test_the_validation_runs_the_crds_cel_rules() -> None:
    # A Service backendRef without a port is rejected by a CEL rule of the CRD.
    route = copy.deepcopy(ROUTES["qwen"])
    del route["spec"]["rules"][0]["backendRefs"][0]["port"]
    crd = crd_validate.crd_for(route)
    assert crd is not None
    assert any("port" in e.lower() for e in crd_validate.validate(route, crd))


def test_the_envoygateway_sample_names_the_service_route() -> None:
    cb = backend("EnvoyGateway")
    route = ROUTES[cb["spec"]["gateway"]["httpRouteRef"]["name"]]
    (ref,) = route["spec"]["rules"][0]["backendRefs"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    assert ref["port"] in {p["number"] for p in cb["spec"]["gateway"]["targetPorts"]}


def test_the_inferencepool_route_names_the_pool_the_operator_emits() -> None:
    cb = backend("InferencePool")
    pool_routes = [
        ref
        for route in ROUTES.values()
        for rule in route["spec"]["rules"]
        for ref in rule["backendRefs"]
        if ref.get("kind") == "InferencePool"
    ]
    assert pool_routes == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": cb["metadata"]["name"]}
    ]
