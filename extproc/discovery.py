"""Endpoint discovery for ``inference-cache serve`` in a cluster: ``endpoints[]`` from the API.

Owner: ``inference_cache.extproc`` (``serve`` starts :func:`watch` when ``discovery.enabled``).
Data flow, on every change the API reports::

    list + watch CacheBackends, list + watch pods  (one :func:`follow` each: a local copy of
        the objects, kept by the watch's ADDED/MODIFIED/DELETED events; re-listed on
        410 Gone, after an error (with backoff) and every ``discovery.interval_s`` anyway)
    the copies --discover_from--> EndpointConfig rows
        (``operator.discovery.discover_endpoints`` per backend; ``models[]`` stay the
         config file's; a backend whose rows do not validate is skipped, logged)
    config file endpoints + discovered --desired--> the endpoints the server should run
        (a file endpoint wins over a discovered one with the same address)
    running vs desired --plan--> workers to start / stop (serve applies it: EndpointWorkers,
        readiness, ``EndpointPicker.set_endpoints``)

Changes are debounced (``DEBOUNCE_S``): a burst of pod events is one recompute, and a pod
that goes NotReady or away leaves the routing set within that delay. Nothing is applied
before both kinds were listed once. When the API fails (down, forbidden, a CRD missing) the
copies, hence the last applied set, stay and the error is logged; the kind is re-listed with
backoff. The Kubernetes client is synchronous (the operator's ``Kube`` adapter), so each
list and each watch read runs in a worker thread; cancelling :func:`watch` closes the open
watch connections, which unblocks those threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

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
    """One full poll: :func:`discover_from` the CacheBackends and pods listed now (in
    ``namespace``, ``""`` = all). Raises ``kube.KubeError`` when listing fails."""
    scope = namespace or None
    backends = k.list(crds.API_VERSION, "CacheBackend", namespace=scope)
    pods = k.list("v1", "Pod", namespace=scope)
    return discover_from(backends, pods, model_config)


def discover_from(
    backends: Iterable[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], model_config: config_mod.Config
) -> list[config_mod.EndpointConfig]:
    """The endpoints of every CacheBackend over ``pods``, validated together with
    ``model_config.endpoints`` (the file's).

    A backend whose endpoints do not validate (an unknown ``gateway.modelName``, a tenant or
    an address clashing with endpoints already accepted) is skipped and logged."""
    found: list[config_mod.EndpointConfig] = []
    for backend in sorted(backends, key=key):
        so_far = replace(model_config, endpoints=(*model_config.endpoints, *found))
        try:
            found += op_discovery.discover_endpoints(backend, pods, so_far)
        except config_mod.ConfigError as exc:
            log.warning("discovery_backend_skipped", extra={"backend": key(backend), "error": str(exc)})
    return found


def key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` of an object: its place in a :func:`follow` copy, and its name
    in logs."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ""
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


async def refresh(
    fetch: Callable[[], Sequence[config_mod.EndpointConfig]],
    apply: Callable[[Sequence[config_mod.EndpointConfig]], None],
) -> bool:
    """One full poll (``serve``'s ``discover_once``): ``fetch`` in a worker thread, then
    ``apply`` its answer. An API failure
    (or an unreadable ServiceAccount token) is logged and nothing is applied (``False``):
    the last applied set stays."""
    try:
        found = await asyncio.to_thread(fetch)
    except (kube.KubeError, OSError) as exc:
        log.warning("discovery_failed", extra={"error": str(exc)})
        return False
    apply(found)
    return True


# -- list + watch ------------------------------------------------------------------------------

#: Seconds a burst of changes is collected before the endpoints are recomputed.
DEBOUNCE_S: Final = 0.1
#: Retry delays after a failed list or watch: doubling from the first to the cap.
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


#: What :func:`follow` keeps of each object (``None``: all of it).
Trim = Callable[[Mapping[str, Any]], kube.Obj]


def backoff_s(failures: int) -> float:
    """The delay before retry number ``failures`` (1-based) of a list or watch."""
    return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1)))


def trim_pod(pod: Mapping[str, Any]) -> kube.Obj:
    """The fields of a pod discovery reads (name, namespace, labels, deletion, IP,
    conditions): the copy of every pod of the scope stays small."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "apiVersion": pod.get("apiVersion", "v1"),
        "kind": pod.get("kind", "Pod"),
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "labels", "deletionTimestamp", "resourceVersion")
            if k in meta
        },
        "status": {k: status[k] for k in ("podIP", "conditions") if k in status},
    }


def apply_event(objects: dict[str, kube.Obj], event: Mapping[str, Any], trim: Trim | None = None) -> str:
    """Apply one watch event to ``objects`` (ADDED/MODIFIED store, DELETED drops, BOOKMARK
    only moves the position); returns the event's ``resourceVersion`` (``""`` if absent)."""
    obj = event.get("object") or {}
    kind = event.get("type")
    if kind in ("ADDED", "MODIFIED"):
        objects[key(obj)] = trim(obj) if trim is not None else dict(obj)
    elif kind == "DELETED":
        objects.pop(key(obj), None)
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class _OpenWatch:
    """The watch a worker thread is opening or reading, closable from the loop at any time
    (a watch opened after :meth:`close` is closed at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: kube.WatchStream | None = None
        self._closed = False

    def open(self, opener: Callable[[], kube.WatchStream]) -> Iterator[kube.Obj]:
        stream = opener()
        with self._lock:
            self._stream = stream
            closed = self._closed
        if closed:
            stream.close()
        return iter(stream)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream = self._stream
        if stream is not None:
            stream.close()


_END: Final = object()


async def follow(
    k: kube.Kube,
    api_version: str,
    kind: str,
    objects: dict[str, kube.Obj],
    changed: Callable[[], None],
    *,
    namespace: str | None = None,
    relist_s: float,
    trim: Trim | None = None,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Keep ``objects`` (``namespace/name`` -> object) equal to the API's ``kind`` until
    cancelled: list, then watch from the list's ``resourceVersion``, calling ``changed``
    after the list and after every event. The watch is re-opened from the last position
    when the server ends it, and the kind re-listed on 410 Gone at once, every
    ``relist_s`` (the safety net), and after an error with :func:`backoff_s` (``objects``
    keep their last content meanwhile)."""
    failures = 0
    while True:
        try:
            items, version = await asyncio.to_thread(k.list_versioned, api_version, kind, namespace=namespace)
        except kube.KubeError as exc:
            failures += 1
            log.warning(
                "discovery_list_failed", extra={"kind": kind, "error": str(exc), "failures": failures}
            )
            await sleep(backoff_s(failures))
            continue
        failures = 0
        objects.clear()
        objects.update((key(o), trim(o) if trim is not None else o) for o in items)
        changed()
        try:
            async with asyncio.timeout(relist_s):
                while True:  # re-watch from the last position whenever the server ends a watch
                    version = await _watch_once(
                        k, api_version, kind, namespace, version, relist_s, objects, trim, changed
                    )
        except TimeoutError:
            log.debug("discovery_relist", extra={"kind": kind})
        except kube.Gone:
            log.info("discovery_watch_expired", extra={"kind": kind})
        except kube.KubeError as exc:
            failures += 1
            log.warning(
                "discovery_watch_failed", extra={"kind": kind, "error": str(exc), "failures": failures}
            )
            await sleep(backoff_s(failures))


async def _watch_once(
    k: kube.Kube,
    api_version: str,
    kind: str,
    namespace: str | None,
    version: str,
    timeout_s: float,
    objects: dict[str, kube.Obj],
    trim: Trim | None,
    changed: Callable[[], None],
) -> str:
    """One watch connection from ``version``, applied to ``objects`` until the server ends
    it; returns the last position. Closed (its thread unblocked) when cancelled."""
    handle = _OpenWatch()
    try:
        events = await asyncio.to_thread(
            handle.open,
            lambda: k.watch(
                api_version, kind, namespace=namespace, resource_version=version, timeout_s=timeout_s
            ),
        )
        while (event := await asyncio.to_thread(next, events, _END)) is not _END:
            assert isinstance(event, dict)
            version = apply_event(objects, event, trim) or version
            if event.get("type") != "BOOKMARK":
                changed()
    finally:
        handle.close()
    return version


async def watch(
    k: kube.Kube,
    model_config: config_mod.Config,
    apply: Callable[[Sequence[config_mod.EndpointConfig]], None],
    *,
    debounce_s: float = DEBOUNCE_S,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Discovery until cancelled: :func:`follow` CacheBackends and pods (in
    ``discovery.namespace``) and, ``debounce_s`` after a change, ``apply`` what
    :func:`discover_from` finds in them (once both kinds have been listed)."""
    settings = model_config.discovery
    scope = settings.namespace or None
    backends: dict[str, kube.Obj] = {}
    pods: dict[str, kube.Obj] = {}
    listed: set[str] = set()
    wake = asyncio.Event()

    def changed_of(kind: str) -> Callable[[], None]:
        def changed() -> None:
            listed.add(kind)
            wake.set()

        return changed

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(
            follow(
                k,
                crds.API_VERSION,
                "CacheBackend",
                backends,
                changed_of("CacheBackend"),
                namespace=scope,
                relist_s=settings.interval_s,
                sleep=sleep,
            ),
            name="discovery-cachebackends",
        )
        tasks.create_task(
            follow(
                k,
                "v1",
                "Pod",
                pods,
                changed_of("Pod"),
                namespace=scope,
                relist_s=settings.interval_s,
                trim=trim_pod,
                sleep=sleep,
            ),
            name="discovery-pods",
        )
        while True:
            await wake.wait()
            await sleep(debounce_s)
            wake.clear()
            if len(listed) == 2:
                apply(discover_from(list(backends.values()), list(pods.values()), model_config))


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
