"""Endpoint discovery for ``inference-cache serve`` in a cluster: ``endpoints[]`` from the API.

Owner: ``inference_cache.extproc`` (``serve`` starts :func:`poll` when ``discovery.enabled``).
Data flow, every ``discovery.interval_s`` (a plain poll, no watch)::

    Kube.list CacheBackends + pods --discover--> EndpointConfig rows
        (``operator.discovery.discover_endpoints`` per backend; ``models[]`` stay the
         config file's; a backend whose rows do not validate is skipped, logged)
    config file endpoints + discovered --desired--> the endpoints the server should run
        (a file endpoint wins over a discovered one with the same address)
    running vs desired --plan--> workers to start / stop (serve applies it: EndpointWorkers,
        readiness, ``EndpointPicker.set_endpoints``)

When the API fails (down, forbidden, a CRD missing) the last known set stays and the error
is logged; the next tick tries again. The Kubernetes client is synchronous (the operator's
``Kube`` adapter), so each poll runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from kubernetes import client as k8s

from inference_cache import config as config_mod
from inference_cache.extproc import auth
from inference_cache.operator import crds, kube
from inference_cache.operator import discovery as op_discovery

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to change so the running endpoints become the desired ones."""

    #: Endpoints to start a worker for (new, or changed: also listed in ``stop``).
    start: tuple[config_mod.EndpointConfig, ...]
    #: Addresses whose worker stops (gone, or changed).
    stop: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.start and not self.stop


def plan(
    running: Mapping[str, config_mod.EndpointConfig], desired: Sequence[config_mod.EndpointConfig]
) -> Plan:
    """``running`` (address -> its config) vs ``desired``: an endpoint whose settings changed
    (say its kv_events port) is restarted, i.e. both stopped and started."""
    wanted = {e.address: e for e in desired}
    stop = tuple(a for a, e in running.items() if wanted.get(a) != e)
    start = tuple(e for a, e in wanted.items() if running.get(a) != e)
    return Plan(start=start, stop=stop)


def desired(
    static: Sequence[config_mod.EndpointConfig], discovered: Sequence[config_mod.EndpointConfig]
) -> tuple[config_mod.EndpointConfig, ...]:
    """The config file's endpoints, then the discovered ones not already there (by address)."""
    seen = {e.address for e in static}
    return (*static, *(e for e in discovered if e.address not in seen))


def discover(
    k: kube.Kube, model_config: config_mod.Config, namespace: str = ""
) -> list[config_mod.EndpointConfig]:
    """The endpoints of every CacheBackend (in ``namespace``, ``""`` = all) over the pods of
    the same scope, validated together with ``model_config.endpoints`` (the file's).

    A backend whose endpoints do not validate (an unknown ``gateway.modelName``, a tenant or
    an address clashing with endpoints already accepted) is skipped and logged. Raises
    ``kube.KubeError`` when listing fails."""
    scope = namespace or None
    backends = k.list(crds.API_VERSION, "CacheBackend", namespace=scope)
    pods = k.list("v1", "Pod", namespace=scope)
    found: list[config_mod.EndpointConfig] = []
    for backend in sorted(backends, key=_name):
        so_far = replace(model_config, endpoints=(*model_config.endpoints, *found))
        try:
            found += op_discovery.discover_endpoints(backend, pods, so_far)
        except config_mod.ConfigError as exc:
            log.warning("discovery_backend_skipped", extra={"backend": _name(backend), "error": str(exc)})
    return found


def _name(obj: Mapping[str, object]) -> str:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ""
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


async def refresh(
    fetch: Callable[[], Sequence[config_mod.EndpointConfig]],
    apply: Callable[[Sequence[config_mod.EndpointConfig]], None],
) -> bool:
    """One poll: ``fetch`` in a worker thread, then ``apply`` its answer. An API failure
    (or an unreadable ServiceAccount token) is logged and nothing is applied (``False``):
    the last applied set stays."""
    try:
        found = await asyncio.to_thread(fetch)
    except (kube.KubeError, OSError) as exc:
        log.warning("discovery_failed", extra={"error": str(exc)})
        return False
    apply(found)
    return True


async def poll(
    fetch: Callable[[], Sequence[config_mod.EndpointConfig]],
    apply: Callable[[Sequence[config_mod.EndpointConfig]], None],
    *,
    interval_s: float,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """:func:`refresh` every ``interval_s`` until cancelled (a plain poll, not a watch)."""
    while True:
        await refresh(fetch, apply)
        await sleep(interval_s)


def api_client(cfg: auth.KubeAPIConfig) -> k8s.ApiClient:
    """A Kubernetes client for the pod's own ServiceAccount (``auth.in_cluster_config()``);
    the projected token is re-read on every request (the kubelet rotates it)."""
    conf = k8s.Configuration(host=cfg.base_url)
    if cfg.ca_file is not None:
        conf.ssl_ca_cert = str(cfg.ca_file)
    token_file = cfg.token_file
    if token_file is not None:
        conf.api_key_prefix = {"authorization": "Bearer"}

        def refresh(c: k8s.Configuration) -> None:
            c.api_key = {"authorization": token_file.read_text().strip()}

        conf.refresh_api_key_hook = refresh  # type: ignore[assignment]  # typed as None upstream
        refresh(conf)
    return k8s.ApiClient(conf)
