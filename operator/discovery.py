"""Engine endpoint discovery for ``inference-cache serve`` running in a cluster.

Owner: ``inference_cache.operator`` (the serve-side watch of pods and CacheBackends calls
it). Data flow: CacheBackend (``spec.gateway.modelName``, ``spec.gateway.targetPorts``,
``spec.engineSelector``) + the pods of its namespace -> :func:`discover_endpoints` ->
``inference_cache.config.EndpointConfig`` rows for the serve config's ``endpoints[]``
(``models[]`` still comes from the mounted serve config). One endpoint per Ready pod and
target port; the port's position in ``targetPorts`` is the vLLM data-parallel rank, which
offsets the KV-event PUB (5557) and replay (5657) ports exactly as vLLM does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from inference_cache import config
from inference_cache.operator.backend import match_labels, pod_ready, selects

#: vLLM ``--kv-events-config`` ports the pod webhook injects (rank 0; rank r adds r).
KV_EVENTS_PORT: Final = 5557
REPLAY_PORT: Final = 5657
#: The engine HTTP port when ``gateway.targetPorts`` is unset (vLLM's default).
DEFAULT_TARGET_PORT: Final = 8000


def target_ports(backend: Mapping[str, Any]) -> list[int]:
    """``spec.gateway.targetPorts`` as ints (``[8000]`` when unset); entries may be ints or
    InferencePool-style ``{number: N}`` objects."""
    ports = ((backend.get("spec") or {}).get("gateway") or {}).get("targetPorts") or [DEFAULT_TARGET_PORT]
    return [int(p["number"]) if isinstance(p, Mapping) else int(p) for p in ports]


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def discover_endpoints(
    backend: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    model_config: config.Config,
) -> list[config.EndpointConfig]:
    """The serve endpoints of one CacheBackend, validated against ``model_config``.

    Pods must be in the backend's namespace, match its (non-empty) engine selector, be
    Ready and have an IP; others are left out. A backend without ``gateway.modelName``
    serves nothing through us (``[]``). Raises ``config.ConfigError`` when the result
    does not validate (e.g. ``modelName`` is not one of ``model_config.models``).
    """
    spec = backend.get("spec") or {}
    model = (spec.get("gateway") or {}).get("modelName") or ""
    selector = match_labels(backend)
    if not model or not selector:
        return []
    namespace = backend["metadata"]["namespace"]
    engine = ((spec.get("integration") or {}).get("engine") or "vllm").lower()
    ports = target_ports(backend)
    endpoints: list[config.EndpointConfig] = []
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("name", ""))):
        ip = (pod.get("status") or {}).get("podIP")
        if (
            pod["metadata"].get("namespace") != namespace
            or not ip
            or not selects(selector, pod)
            or not pod_ready(pod)
        ):
            continue
        for rank, port in enumerate(ports):
            endpoints.append(
                config.EndpointConfig(
                    address=_hostport(ip, port),
                    model=model,
                    tenant=namespace,
                    kv_events=f"tcp://{_hostport(ip, KV_EVENTS_PORT + rank)}",
                    replay=f"tcp://{_hostport(ip, REPLAY_PORT + rank)}",
                    metrics_url=f"http://{_hostport(ip, port)}/metrics",
                    engine=engine,
                )
            )
    config.validate(replace(model_config, endpoints=(*model_config.endpoints, *endpoints)))
    return endpoints
