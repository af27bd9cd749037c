"""Gateway objects for one CacheBackend: an InferencePool, or Envoy Gateway policies.

Owner: ``inference-cache operator`` (issue #7). Pure functions, no I/O: the CacheBackend
handler passes the custom resource, where our server's ext_proc Service lives
(``GatewaySettings``) and the names of the CRDs installed in the cluster; it gets back the
objects to apply and the ``status.gateway`` lists (``emitted``, ``skipped``). Applying,
pruning and writing status are the handler's job.

``spec.gateway.mode`` picks ONE way to put our ext_proc server in front of the model:

* ``InferencePool`` — an ``inference.networking.k8s.io/v1`` InferencePool whose
  ``endpointPickerRef`` is our Service; the user's HTTPRoute names the pool as a backend
  and an Inference-Extension gateway (Envoy AI Gateway, Istio, kgateway, GKE, NGINX
  Gateway Fabric) calls us (research protocols.md §5.2, anchors.md §1.5).
* ``EnvoyGateway`` — an EnvoyExtensionPolicy that adds our server as ``extProc`` on the
  user's HTTPRoute, plus a BackendTrafficPolicy whose ``endpointOverride`` routes to the
  pod we name in ``x-gateway-destination-endpoint`` (protocols.md §6.1-6.2, anchors.md §8).
* ``None`` — nothing.

Both on one route would run ext_proc twice (protocols.md §6.3); one mode per backend
makes that impossible for a single CacheBackend. Nothing here raises on user input: what
cannot be expressed (a missing CRD, ``matchExpressions``, a cross-namespace endpoint
picker, no HTTPRoute) becomes a ``skipped`` entry with its reason, for status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypedDict

from inference_cache.extproc import picking
from inference_cache.operator import backend as backend_mod

#: CRD names (``metadata.name`` of the CustomResourceDefinition) we emit objects of.
INFERENCE_POOL_CRD: Final = "inferencepools.inference.networking.k8s.io"
ENVOY_EXTENSION_POLICY_CRD: Final = "envoyextensionpolicies.gateway.envoyproxy.io"
BACKEND_TRAFFIC_POLICY_CRD: Final = "backendtrafficpolicies.gateway.envoyproxy.io"

#: Header our ext_proc server sets to the chosen ``ip:port`` (EPP protocol, protocols.md §5.5).
DESTINATION_HEADER: Final = picking.DESTINATION_HEADER

#: ``spec.gateway`` defaults (the CacheBackend CRD applies the same; repeated here so an
#: object written before a field existed still yields the documented behaviour).
DEFAULT_BODY_MODE: Final = "Buffered"
#: Long enough for whole request bodies; Envoy Gateway's own default is 200 ms.
DEFAULT_MESSAGE_TIMEOUT: Final = "60s"
DEFAULT_FAIL_OPEN: Final = True

#: Labels on every emitted object (the original's CacheBackend labels, component added).
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
LABEL_COMPONENT: Final = "gateway"

#: Envoy Gateway's Duration pattern for ``messageTimeout``.
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
#: InferencePool ``spec.targetPorts`` bounds (GAIE v1.1+; v1.0.0 allowed a single port).
_MAX_TARGET_PORTS: Final = 8


class Emitted(TypedDict):
    """One ``status.gateway.emitted[]`` entry."""

    kind: str
    name: str


class Skipped(TypedDict):
    """One ``status.gateway.skipped[]`` entry."""

    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Where the ext_proc endpoint of ``inference-cache serve`` is reachable in the cluster."""

    #: Name of the server's Service.
    service_name: str
    #: Namespace of the server's Service. An InferencePool can only name an endpoint
    #: picker in its own namespace; an EnvoyExtensionPolicy elsewhere needs a ReferenceGrant.
    service_namespace: str
    #: The Service port (not the container port) of the ext_proc gRPC listener.
    extproc_port: int = 9002


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    """What to apply for one CacheBackend, and what to write to ``status.gateway``."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    emitted: list[Emitted] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def desired_gateway_objects(
    backend: Mapping[str, Any],
    settings: GatewaySettings,
    available: frozenset[str],
) -> GatewayPlan:
    """The gateway objects for ``backend`` (a CacheBackend as read from the API).

    ``available`` holds the names of the CRDs present in the cluster (e.g.
    ``INFERENCE_POOL_CRD``); an object whose CRD is absent is skipped, not emitted.
    """
    gateway: Mapping[str, Any] = backend.get("spec", {}).get("gateway") or {}
    mode = gateway.get("mode") or "None"
    if mode == "InferencePool":
        return _plan([_inference_pool(backend, gateway, settings, available)])
    if mode == "EnvoyGateway":
        return _plan(_envoy_gateway(backend, gateway, settings, available))
    return GatewayPlan()


# An object, or why it was not emitted: (kind, object) or (kind, reason).
_Outcome = tuple[str, dict[str, Any] | str]


def _plan(outcomes: Sequence[_Outcome]) -> GatewayPlan:
    plan = GatewayPlan()
    for kind, result in outcomes:
        if isinstance(result, str):
            plan.skipped.append(Skipped(kind=kind, reason=result))
        else:
            plan.objects.append(result)
            plan.emitted.append(Emitted(kind=kind, name=result["metadata"]["name"]))
    return plan


def _inference_pool(
    backend: Mapping[str, Any],
    gateway: Mapping[str, Any],
    settings: GatewaySettings,
    available: frozenset[str],
) -> _Outcome:
    kind = "InferencePool"
    if INFERENCE_POOL_CRD not in available:
        return kind, f"CRD {INFERENCE_POOL_CRD} (Gateway API Inference Extension v1) is not installed"
    namespace = backend["metadata"]["namespace"]
    if settings.service_namespace != namespace:
        return kind, (
            f"endpointPickerRef cannot leave the pool's namespace {namespace!r}: "
            f"the server Service is in {settings.service_namespace!r}"
        )
    selector: Mapping[str, Any] = backend["spec"].get("engineSelector") or {}
    if selector.get("matchExpressions"):
        return kind, "engineSelector.matchExpressions cannot be expressed in an InferencePool selector"
    match_labels: Mapping[str, str] = selector.get("matchLabels") or {}
    if not match_labels:
        return kind, "engineSelector.matchLabels is empty: the pool would select no pods"
    ports = [_port_number(p) for p in gateway.get("targetPorts") or []]
    if not ports:
        return kind, "gateway.targetPorts is empty: an InferencePool needs the engines' ports"
    if len(ports) > _MAX_TARGET_PORTS or len(set(ports)) != len(ports):
        return kind, f"gateway.targetPorts must be 1-{_MAX_TARGET_PORTS} distinct ports, got {ports}"
    fail_open = gateway.get("failOpen", DEFAULT_FAIL_OPEN)
    return kind, {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": kind,
        "metadata": _metadata(backend),
        "spec": {
            "selector": {"matchLabels": dict(match_labels)},
            "targetPorts": [{"number": port} for port in ports],
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": settings.service_name,
                "port": {"number": settings.extproc_port},
                "failureMode": "FailOpen" if fail_open else "FailClose",
            },
        },
    }


def _envoy_gateway(
    backend: Mapping[str, Any],
    gateway: Mapping[str, Any],
    settings: GatewaySettings,
    available: frozenset[str],
) -> list[_Outcome]:
    route = (gateway.get("httpRouteRef") or {}).get("name")
    outcomes: list[_Outcome] = []
    for kind, crd in (
        ("EnvoyExtensionPolicy", ENVOY_EXTENSION_POLICY_CRD),
        ("BackendTrafficPolicy", BACKEND_TRAFFIC_POLICY_CRD),
    ):
        if crd not in available:
            outcomes.append((kind, f"CRD {crd} (Envoy Gateway) is not installed"))
        elif not route:
            outcomes.append((kind, "gateway.httpRouteRef.name is required in EnvoyGateway mode"))
        elif kind == "EnvoyExtensionPolicy":
            outcomes.append((kind, _extension_policy(backend, gateway, settings, route)))
        else:
            outcomes.append((kind, _traffic_policy(backend, route)))
    namespace = backend["metadata"]["namespace"]
    if settings.service_namespace != namespace and route and ENVOY_EXTENSION_POLICY_CRD in available:
        outcomes.append(
            (
                "ReferenceGrant",
                f"not managed: the server Service is in {settings.service_namespace!r}, so a ReferenceGrant "
                f"there must allow EnvoyExtensionPolicy from namespace {namespace!r}",
            )
        )
    return outcomes


def _extension_policy(
    backend: Mapping[str, Any],
    gateway: Mapping[str, Any],
    settings: GatewaySettings,
    route: str,
) -> dict[str, Any] | str:
    timeout = gateway.get("messageTimeout") or DEFAULT_MESSAGE_TIMEOUT
    if not _DURATION.match(timeout):
        return f"gateway.messageTimeout {timeout!r} is not a duration such as 60s or 1m30s"
    body_mode = gateway.get("bodyMode") or DEFAULT_BODY_MODE
    backend_ref: dict[str, Any] = {
        "group": "",
        "kind": "Service",
        "name": settings.service_name,
        "port": settings.extproc_port,
    }
    if settings.service_namespace != backend["metadata"]["namespace"]:
        backend_ref["namespace"] = settings.service_namespace
    processing_mode: dict[str, Any] = {"request": {"body": body_mode}}
    if gateway.get("responseProcessing", False):
        processing_mode["response"] = {}
    ext_proc: dict[str, Any] = {
        "backendRefs": [backend_ref],
        "messageTimeout": timeout,
        "processingMode": processing_mode,
        "metadata": {
            # The EPP destination is also written as dynamic metadata under envoy.lb;
            # Envoy drops it unless the namespace is writable.
            "writableNamespaces": ["envoy.lb"],
            # Subset hint in, served endpoint back on the response path (EPP protocol).
            "accessibleNamespaces": ["envoy.lb.subset_hint", "envoy.lb"],
        },
    }
    # The EnvoyExtensionPolicy CRD rejects failOpen=true with FullDuplexStreamed (CEL):
    # there the policy stays fail-closed (absent = false), whatever spec.gateway says.
    if gateway.get("failOpen", DEFAULT_FAIL_OPEN) and body_mode != "FullDuplexStreamed":
        ext_proc["failOpen"] = True
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyExtensionPolicy",
        "metadata": _metadata(backend),
        "spec": {"targetRefs": [_route_target(route)], "extProc": [ext_proc]},
    }


def _traffic_policy(backend: Mapping[str, Any], route: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "BackendTrafficPolicy",
        "metadata": _metadata(backend),
        "spec": {
            "targetRefs": [_route_target(route)],
            "loadBalancer": {
                # The fallback when the header is absent or names no live endpoint.
                "type": "LeastRequest",
                "endpointOverride": {"extractFrom": [{"header": DESTINATION_HEADER}]},
            },
        },
    }


def _route_target(route: str) -> dict[str, str]:
    return {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route}


def _port_number(port: int | Mapping[str, int]) -> int:
    """A ``targetPorts`` item: a bare number, or ``{number: n}`` as InferencePool writes it."""
    return port if isinstance(port, int) else int(port["number"])


def _metadata(backend: Mapping[str, Any]) -> dict[str, Any]:
    labels = {**backend_mod.selector_labels(backend["metadata"]["name"]), COMPONENT_LABEL: LABEL_COMPONENT}
    return backend_mod.owned_metadata(backend, labels)
