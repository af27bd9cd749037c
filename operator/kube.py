"""The operator's one seam to the Kubernetes API: a small typed adapter over ``ApiClient``.

Owner: ``inference-cache operator`` (issue #7). Data flow: the kopf handlers
(``operator.handlers_*``) read observed objects through :class:`Kube`, hand them to the
pure ``desired_*`` functions, and write the results back through it (server-side apply,
deletes, status merge patches, merge and strategic patches, Events). kopf itself talks to
the API with its own client for watching; everything the handlers do goes through here.

Objects are plain JSON dicts (what the pure functions consume and produce), addressed by
``(apiVersion, kind, namespace, name)``; the REST path is built from a plural table (our
CRDs' declared plurals plus Kubernetes' own kind-to-resource guess), so no discovery
round-trips happen. All methods are synchronous: kopf runs sync handlers in its thread pool
(and serve's endpoint discovery calls :meth:`Kube.list_versioned` and :meth:`Kube.watch`
from worker threads; :meth:`WatchStream.close` unblocks a thread reading a watch).

Errors are translated once, here: every HTTP failure becomes a :class:`KubeError`
subclass (:class:`NotFound`, :class:`Conflict`, :class:`Forbidden`, :class:`Invalid`,
:class:`Unavailable`, :class:`Gone`); callers never see ``ApiException`` or urllib3 errors. Only the
``message`` of a ``kind: Status`` body is kept (other bodies may echo what we sent).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal

import urllib3
from kubernetes import client as k8s

from inference_cache.operator import crds

Obj = dict[str, Any]
#: A list of objects (an alias: inside :class:`Kube`, ``list`` is the method).
Objs = list[Obj]

FIELD_MANAGER: Final = "inference-cache-operator"
#: ``source.component`` / ``reportingComponent`` of the Events we post.
EVENT_COMPONENT: Final = "inference-cache-operator"
CRD_API_VERSION: Final = "apiextensions.k8s.io/v1"
#: The apiserver rejects longer Event messages; kopf trims to the same size.
_EVENT_MESSAGE_MAX: Final = 1024
#: Error messages are cut here so a large Status never floods the log.
_ERROR_MESSAGE_MAX: Final = 512
_LIST_PAGE: Final = 500

#: ``Kube.patch`` kinds: JSON merge patch, or Kubernetes' strategic merge patch.
PatchType = Literal["merge", "strategic"]
_PATCH_CONTENT_TYPES: Final[dict[str, str]] = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}

log = logging.getLogger(__name__)


class KubeError(Exception):
    """A failed Kubernetes API call (``status`` is the HTTP status, ``None`` without one)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    """404: the object, or its resource type (a CRD not installed), does not exist."""


class Conflict(KubeError):
    """409: already exists, or a stale ``resourceVersion``."""


class Forbidden(KubeError):
    """401/403: RBAC (or authentication) does not allow the call."""


class Gone(KubeError):
    """410: a watch's ``resourceVersion`` is too old (compacted); list again."""


class Invalid(KubeError):
    """400/422: the object or patch was rejected by validation."""


class Unavailable(KubeError):
    """429, 5xx, timeouts and connection failures: worth retrying later."""


def _error_class(status: int) -> type[KubeError]:
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status == 410:
        return Gone
    if status in (401, 403):
        return Forbidden
    if status in (400, 422):
        return Invalid
    if status == 429 or status >= 500:
        return Unavailable
    return KubeError


def _status_message(body: bytes | str | None) -> str:
    try:
        payload = json.loads(body or b"")
    except ValueError:
        return ""
    if isinstance(payload, dict) and payload.get("kind") == "Status":
        return str(payload.get("message") or payload.get("reason") or "")[:_ERROR_MESSAGE_MAX]
    return ""


#: Resources whose plural is not Kubernetes' guess from the kind (our CRDs are listed too,
#: from their own definitions).
_IRREGULAR_PLURALS: Final = {"Endpoints": "endpoints"}


def plural(kind: str) -> str:
    """The resource name of ``kind``: our CRDs' declared plural, else Kubernetes' own guess
    (``meta.UnsafeGuessKindToResource``: lower case, ``s`` -> ``ses``, ``y`` -> ``ies``)."""
    if kind in _PLURALS:
        return _PLURALS[kind]
    lower = kind.lower()
    if lower.endswith("s"):
        return lower + "es"
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + "s"


_PLURALS: Final[dict[str, str]] = _IRREGULAR_PLURALS | {
    c["spec"]["names"]["kind"]: c["spec"]["names"]["plural"] for c in crds.all_crds()
}


def resource_path(
    api_version: str,
    kind: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path: ``/api/v1/...`` for the core group, ``/apis/<group>/<version>/...``
    otherwise; ``namespace=None`` (or empty) addresses a cluster-scoped resource, or all
    namespaces when listing."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural(kind))
    if name is not None:
        parts.append(name)
        if subresource is not None:
            parts.append(subresource)
    return "/".join(parts)


def selector_string(selector: str | Mapping[str, str] | None) -> str | None:
    """A label selector as the API takes it (``a=b,c=d`` from a mapping)."""
    if selector is None or isinstance(selector, str):
        return selector
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


class WatchStream:
    """The events of one open watch: ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK, "object":
    {...}}`` with ``apiVersion`` and ``kind`` filled in. Iteration ends when the server ends
    the watch; an ``ERROR`` event raises its :class:`KubeError` (:class:`Gone` for 410), a
    broken connection :class:`Unavailable`. :meth:`close` may be called from another thread
    to unblock a read in progress (the iteration then ends or raises :class:`Unavailable`)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, api_version: str, kind: str, what: str) -> None:
        self._response = response
        self._api_version = api_version
        self._kind = kind
        self._what = what

    def __iter__(self) -> Iterator[Obj]:
        try:
            for line in self._response:
                if not line.strip():
                    continue
                event = json.loads(line)
                if not isinstance(event, dict):
                    continue
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    code = int(obj.get("code") or 0)
                    message = str(obj.get("message") or obj.get("reason") or "")[:_ERROR_MESSAGE_MAX]
                    raise _error_class(code)(f"{self._what}: {code} {message}", status=code or None)
                yield {
                    "type": event.get("type"),
                    "object": {"apiVersion": self._api_version, "kind": self._kind, **obj},
                }
        # AttributeError: close() from another thread mid-read (urllib3 drops its file).
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as e:
            raise Unavailable(f"{self._what}: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Shut the connection down (thread-safe: a blocked read returns) and close it (a
        watch connection is never reused)."""
        with contextlib.suppress(Exception):  # already closed: nothing to shut
            self._response.shutdown()
        self._response.close()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Kube:
    """Typed access to the API for the operator's handlers (see the module docstring)."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        timeout_s: float = 30.0,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._api = api
        self._timeout_s = timeout_s
        self._clock = clock

    # -- the one place HTTP happens --------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: object = None,
        content_type: str | None = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        """Send one request; the response (status checked, body not read yet) or a
        :class:`KubeError`."""
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        what = f"{method} {path}"
        try:
            response = self._api.call_api(*request, _request_timeout=timeout or self._timeout_s)
            status = int(response.status)
            if not 200 <= status <= 299:
                data = response.read()  # type: ignore[no-untyped-call]  # untyped in kubernetes
                message = _status_message(data) or str(response.reason or "")
                raise _error_class(status)(f"{what}: {status} {message}", status=status)
        except k8s.ApiException as e:  # raised by the REST layer for some failures
            status = int(e.status or 0)
            message = _status_message(e.body) or str(e.reason or "")
            raise _error_class(status)(f"{what}: {status} {message}", status=status or None) from e
        except urllib3.exceptions.HTTPError as e:
            raise Unavailable(f"{what}: {type(e).__name__}: {e}") from e
        return response

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: object = None,
        content_type: str | None = None,
    ) -> Obj:
        response = self._request(method, path, query=query, body=body, content_type=content_type)
        try:
            data = response.read()
        except urllib3.exceptions.HTTPError as e:
            raise Unavailable(f"{method} {path}: {type(e).__name__}: {e}") from e
        if not data:
            return {}
        parsed = json.loads(data)
        return parsed if isinstance(parsed, dict) else {}

    # -- the API the handlers use ------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Obj | None:
        """The live object, or ``None`` when it (or its resource type) does not exist."""
        try:
            return self._call("GET", resource_path(api_version, kind, namespace, name))
        except NotFound:
            return None

    def list(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | Mapping[str, str] | None = None,
    ) -> list[Obj]:
        """Every object of ``kind`` (in ``namespace``, or all namespaces with ``None``), each
        with ``apiVersion`` and ``kind`` filled in (list items lack them). Paginated."""
        return self.list_versioned(api_version, kind, namespace=namespace, label_selector=label_selector)[0]

    def list_versioned(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | Mapping[str, str] | None = None,
    ) -> tuple[Objs, str]:
        """:meth:`list`, plus the list's ``resourceVersion`` (where a :meth:`watch` starts)."""
        query: list[tuple[str, str]] = [("limit", str(_LIST_PAGE))]
        selector = selector_string(label_selector)
        if selector:
            query.append(("labelSelector", selector))
        path = resource_path(api_version, kind, namespace)
        items: Objs = []
        token = ""
        while True:
            page = self._call("GET", path, query=[*query, ("continue", token)] if token else query)
            for item in page.get("items") or []:
                items.append({"apiVersion": api_version, "kind": kind, **item})
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        resource_version: str = "",
        timeout_s: float = 300.0,
    ) -> WatchStream:
        """Open a watch of ``kind`` from ``resource_version`` (the server ends it after
        ``timeout_s``); iterate the returned :class:`WatchStream` for its events."""
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(int(timeout_s)))]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        path = resource_path(api_version, kind, namespace)
        # No read timeout beyond the server's own end of the watch (plus slack): a quiet
        # watch is not a dead one. The connect timeout is the adapter's.
        response = self._request(
            "GET", path, query=query, timeout=(self._timeout_s, timeout_s + self._timeout_s)
        )
        return WatchStream(response.response, api_version, kind, f"WATCH {path}")

    def apply(self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER) -> Obj:
        """Server-side apply of ``obj`` (create or update, ``force``: we own the fields we
        set); returns the object as stored."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self._call(
            "PATCH",
            path,
            query=[("fieldManager", field_manager), ("force", "true")],
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )

    def create(self, obj: Mapping[str, Any]) -> Obj:
        """POST ``obj`` (``metadata.generateName`` works); :class:`Conflict` if it exists."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return self._call("POST", path, body=dict(obj), content_type="application/json")

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete (background propagation: dependents are collected by the GC); ``False``
        when there was nothing to delete."""
        try:
            self._call(
                "DELETE",
                resource_path(api_version, kind, namespace, name),
                body={"propagationPolicy": "Background"},
                content_type="application/json",
            )
        except NotFound:
            return False
        return True

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        patch_type: PatchType = "merge",
    ) -> Obj:
        """Patch an object: a JSON merge patch (RFC 7386, ``"merge"``) or a strategic merge
        patch (``"strategic"``: lists of built-in kinds merge by their key, e.g. webhooks by
        ``name``); returns the object as stored."""
        return self._call(
            "PATCH",
            resource_path(api_version, kind, namespace, name),
            body=dict(patch),
            content_type=_PATCH_CONTENT_TYPES[patch_type],
        )

    def patch_status(
        self, api_version: str, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> None:
        """JSON merge patch (RFC 7386) of ``.status`` through the status subresource.

        ``patch`` is the patch of the status itself (``{"endpoint": None}`` removes
        ``status.endpoint``), not of the whole object."""
        self._call(
            "PATCH",
            resource_path(api_version, kind, namespace, name, "status"),
            body={"status": dict(patch)},
            content_type="application/merge-patch+json",
        )

    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``involved`` (an object as read from the API). Best effort,
        like kopf's own: a failure is logged, never raised (an Event is never worth a
        failed reconcile)."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = self._clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        event: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:_EVENT_MESSAGE_MAX],
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.create(event)
        except KubeError as e:
            log.warning("event %s %s on %s/%s not posted: %s", type_, reason, namespace, meta.get("name"), e)

    def crd_names(self) -> frozenset[str]:
        """Names of the CustomResourceDefinitions in the cluster (``inferencepools.inference.
        networking.k8s.io``, ...). Without permission to list them (or without the API) the
        answer is empty, logged: every optional object then reports its CRD as missing."""
        try:
            items = self.list(CRD_API_VERSION, "CustomResourceDefinition")
        except (Forbidden, NotFound) as e:
            log.warning("cannot list CustomResourceDefinitions, assuming none: %s", e)
            return frozenset()
        return frozenset(item["metadata"]["name"] for item in items)
