"""The operator's admission handlers: kopf ``on.mutate``/``on.validate`` over ``operator.webhook``.

Owner: ``inference_cache.operator`` (seed §6.4-6.5). Thin wiring: the decisions are the pure
functions of ``operator.webhook``; these handlers list what those need through
``operator.kube.Kube`` and turn the results into kopf's answer. Each handler id is the URL
path of its webhook in ``config/webhook/manifests.yaml`` (kopf's webhook server routes
``/<handler id>`` to that handler alone)::

    /mutate--v1-pod                                      Pod CREATE      failurePolicy Ignore
    /mutate-inferencecache-io-v1alpha1-cachebackend      CREATE, UPDATE  failurePolicy Fail
    /validate-inferencecache-io-v1alpha1-cachebackend    CREATE, UPDATE  failurePolicy Fail
    /validate-inferencecache-io-v1alpha1-cachepolicy     CREATE, UPDATE  failurePolicy Fail
    /validate-inferencecache-io-v1alpha1-cachetenant     CREATE, UPDATE  failurePolicy Fail

kopf turns *any* exception of a handler into a denial. The Pod handler therefore catches
everything (fail open: the pod is admitted, at worst without injection and with a warning);
it also applies its RFC 6902 ops to a copy before handing them to kopf (``patch.fns``;
kopf diffs the result into its own JSONPatch), so a patch that would not apply is a warning
here rather than an error after the handler. The CRD handlers fail closed: a denial names
the errors (``webhook.format_errors``) or the listing that failed.

The handlers are synchronous (``Kube`` is): kopf runs them in its thread pool.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, Final

import jsonpatch
import kopf

from inference_cache.operator import crds, webhook
from inference_cache.operator.backend import API_VERSION, GROUP
from inference_cache.operator.kube import Kube, KubeError
from inference_cache.operator.metrics import (
    METRICS,
    RESULT_ALLOWED,
    RESULT_FAIL_OPEN,
    RESULT_SKIPPED,
    OperatorMetrics,
)

log = logging.getLogger(__name__)

VERSION: Final = API_VERSION.partition("/")[2]
MUTATE_POD: Final = "mutate--v1-pod"
MUTATE_CACHE_BACKEND: Final = "mutate-inferencecache-io-v1alpha1-cachebackend"
VALIDATE_CACHE_BACKEND: Final = "validate-inferencecache-io-v1alpha1-cachebackend"
VALIDATE_CACHE_POLICY: Final = "validate-inferencecache-io-v1alpha1-cachepolicy"
VALIDATE_CACHE_TENANT: Final = "validate-inferencecache-io-v1alpha1-cachetenant"
#: Every handler id, i.e. every webhook path of config/webhook/manifests.yaml (without "/").
WEBHOOK_IDS: Final = (
    MUTATE_POD,
    MUTATE_CACHE_BACKEND,
    VALIDATE_CACHE_BACKEND,
    VALIDATE_CACHE_POLICY,
    VALIDATE_CACHE_TENANT,
)
#: The denial code of an invalid object (the apiserver's own for validation failures).
INVALID_CODE: Final = 422
#: The denial code when what a check needs cannot be read (the webhook fails closed).
UNAVAILABLE_CODE: Final = 503


def _name(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName") or "")


def _namespace(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("namespace") or "")


def add_json_patch(patch: kopf.Patch, body: Mapping[str, Any], ops: list[dict[str, Any]]) -> None:
    """Hand RFC 6902 ``ops`` to kopf: checked on a copy of ``body`` now (raises
    ``jsonpatch.JsonPatchException``/``JsonPointerException`` if they do not apply), then
    appended as a patch function kopf runs when it builds the response."""
    if not ops:
        return
    jsonpatch.apply_patch(copy.deepcopy(dict(body)), ops)
    patch.fns.append(lambda target: jsonpatch.apply_patch(target, ops, in_place=True))


def mutate_pod(
    kube: Kube,
    settings: webhook.WebhookSettings,
    body: Mapping[str, Any],
    patch: kopf.Patch,
    warnings: list[str],
) -> str:
    """The engine Pod mutation; never raises (an exception here would deny the pod).
    Returns the admission's metrics result: ``allowed`` (injected), ``skipped`` (not
    injected: ``Mutation.skipped_reason``) or ``fail_open`` (admitted unchanged after an
    error, or with CacheBackends that could not be listed)."""
    try:
        listed = True
        try:
            backends = kube.list(API_VERSION, "CacheBackend", namespace=_namespace(body))
        except KubeError as e:
            backends, listed = [], False
            warnings.append(f"inference-cache: engine injection skipped (cannot list CacheBackends: {e})")
        mutation = webhook.mutate_engine_pod(body, webhook.select_backend(body, backends), settings)
        add_json_patch(patch, body, mutation.patch)
        warnings.extend(mutation.warnings)
    except Exception as e:
        log.exception("pod %s/%s: engine injection failed, admitted unchanged", _namespace(body), _name(body))
        warnings.append(f"inference-cache: engine injection skipped (internal error: {type(e).__name__})")
        return RESULT_FAIL_OPEN
    if not listed:
        return RESULT_FAIL_OPEN
    return RESULT_SKIPPED if mutation.skipped_reason is not None else RESULT_ALLOWED


def default_cache_backend(body: Mapping[str, Any], patch: kopf.Patch, crd: Mapping[str, Any]) -> None:
    """CRD defaults for a CacheBackend (also absent objects the apiserver cannot default)."""
    add_json_patch(patch, body, webhook.default_cache_backend(body, crd))


def _deny(kind: str, body: Mapping[str, Any], errors: list[webhook.FieldError]) -> None:
    if errors:
        raise kopf.AdmissionError(webhook.format_errors(kind, _name(body), errors), code=INVALID_CODE)


def _list_namespace(kube: Kube, kind: str, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    try:
        return kube.list(API_VERSION, kind, namespace=_namespace(body))
    except KubeError as e:
        raise kopf.AdmissionError(
            f"{kind} {_name(body)!r} cannot be checked: listing the namespace's {kind}s failed: {e}",
            code=UNAVAILABLE_CODE,
        ) from e


def validate_cache_backend(body: Mapping[str, Any], old: Mapping[str, Any] | None) -> None:
    _deny("CacheBackend", body, webhook.validate_cache_backend(body, old))


def validate_cache_policy(kube: Kube, body: Mapping[str, Any], old: Mapping[str, Any] | None) -> None:
    existing = [] if old is not None else _list_namespace(kube, "CachePolicy", body)
    _deny("CachePolicy", body, webhook.validate_cache_policy(body, existing, old))


def validate_cache_tenant(kube: Kube, body: Mapping[str, Any], old: Mapping[str, Any] | None) -> None:
    tenant_id = (body.get("spec") or {}).get("tenantID")
    unchanged = old is not None and (old.get("spec") or {}).get("tenantID") == tenant_id
    existing = [] if unchanged else _list_namespace(kube, "CacheTenant", body)
    _deny("CacheTenant", body, webhook.validate_cache_tenant(body, existing, old))


def register(
    registry: kopf.OperatorRegistry,
    kube: Kube,
    settings: webhook.WebhookSettings,
    *,
    cache_backend_crd: Mapping[str, Any] | None = None,
    metrics: OperatorMetrics = METRICS,
) -> None:
    """Register the five admission handlers on ``registry``; ``cache_backend_crd`` is
    where CacheBackend defaults come from (``crds.cache_backend()`` unless given). Each
    request is counted under its handler id (``metrics.admission``)."""
    crd = cache_backend_crd if cache_backend_crd is not None else crds.cache_backend()
    writes: list[kopf.Operation] = ["CREATE", "UPDATE"]

    @kopf.on.mutate("", "v1", "pods", id=MUTATE_POD, operations=["CREATE"], registry=registry)
    @metrics.admission(MUTATE_POD)
    def on_pod(body: kopf.Body, patch: kopf.Patch, warnings: list[str], **_: Any) -> str:
        return mutate_pod(kube, settings, body, patch, warnings)

    @kopf.on.mutate(
        GROUP, VERSION, "cachebackends", id=MUTATE_CACHE_BACKEND, operations=writes, registry=registry
    )
    @metrics.admission(MUTATE_CACHE_BACKEND)
    def on_backend_defaults(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        default_cache_backend(body, patch, crd)

    @kopf.on.validate(
        GROUP, VERSION, "cachebackends", id=VALIDATE_CACHE_BACKEND, operations=writes, registry=registry
    )
    @metrics.admission(VALIDATE_CACHE_BACKEND)
    def on_backend(body: kopf.Body, old: kopf.Body | None = None, **_: Any) -> None:
        validate_cache_backend(body, old)

    @kopf.on.validate(
        GROUP, VERSION, "cachepolicies", id=VALIDATE_CACHE_POLICY, operations=writes, registry=registry
    )
    @metrics.admission(VALIDATE_CACHE_POLICY)
    def on_policy(body: kopf.Body, old: kopf.Body | None = None, **_: Any) -> None:
        validate_cache_policy(kube, body, old)

    @kopf.on.validate(
        GROUP, VERSION, "cachetenants", id=VALIDATE_CACHE_TENANT, operations=writes, registry=registry
    )
    @metrics.admission(VALIDATE_CACHE_TENANT)
    def on_tenant(body: kopf.Body, old: kopf.Body | None = None, **_: Any) -> None:
        validate_cache_tenant(kube, body, old)
