"""Admission logic: the engine Pod mutation and the CacheBackend/CachePolicy/CacheTenant checks.

Owner: ``inference_cache.operator`` (the operator's admission seam). Pure functions only: the
kopf handlers (or any admission server) list the CacheBackends / CachePolicies /
CacheTenants of the namespace, call these functions and turn their results into kopf
patches, warnings and ``AdmissionError``. Nothing here performs I/O or imports kopf.

Data flow of the Pod webhook (``/mutate--v1-pod``, CREATE, ``failurePolicy: Ignore``)::

    AdmissionReview ─► admission_review_response ─► mutate(request)
        select_backend(pod, backends in the namespace) ─► mutate_engine_pod(pod, backend, settings)
        ─► Mutation(patch = RFC 6902 ops, warnings, skipped_reason) ─► base64 JSONPatch response

What a matched vLLM pod gets (engine container = ``settings.engine_container`` or the first):

* ``--kv-events-config`` (unless the pod already sets it): ZMQ PUB ``tcp://*:5557``, replay
  ROUTER ``tcp://*:5657`` and the topic. vLLM offsets both ports by the data-parallel rank,
  as our subscriber does (``index.kvevents.config.EndpointConfig.rank_endpoints``); the gap
  of 100 keeps the rank ports of the two sockets apart.
* ``--prefix-caching-hash-algo`` and one shared ``PYTHONHASHSEED`` (unless set): identical
  engine block hashes and LMCache chunk keys across pods and restarts (protocols §2.3, §7.1).
* Unless ``spec.type`` is ``None``: ``--kv-transfer-config`` (``LMCacheConnectorV1``, role from
  ``integration.role``; replaced in place, the original's reserved flag) and the ``LMCACHE_*``
  variables pointing at the backend's LMCache server (``lm://<endpoint>``).
* ``integration.engineOverrides`` merged as the original does (seed §6.4): only flags and
  variables the injection wrote can be replaced or suppressed; the pod's own stay.
* Annotations ``inferencecache.io/injected-by`` (``ns/name``), ``-uid`` and, with a signing
  key, ``-signature``.

Anti-forgery: the injected-by annotations are never an *input* here. Every admission
re-derives the injection from the pod's args and env (idempotent: an already-mutated pod
gets no ops) and then either overwrites the annotations with our own values or, on every
path that does not inject (skip annotation, no match, shell command, fail-open), removes
them. A pod that arrives with user-written annotations therefore leaves admission with ours
or none. That alone cannot cover what admission never sees: the webhook is fail-open
(``failurePolicy: Ignore``) and annotations stay editable after creation. For readers of
the annotations later on (discovery, status), ``-signature`` is an HMAC-SHA256 under
``settings.signing_key`` of the backend reference, its uid, the engine container and the
final values of the settings we manage; :func:`verify_injection` recomputes it from the
live pod (container args and env are immutable after creation). We sign what we manage,
not the whole spec: later mutating webhooks and API defaulting change other fields.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from inference_cache.durations import parse as parse_duration
from inference_cache.operator.backend import (
    INJECTED_BY_ANNOTATION,
    SKIP_INJECT_ANNOTATION,
    endpoint_shape_error,
    opted_out,
)
from inference_cache.operator.gateway import DEFAULT_BODY_MODE, DEFAULT_FAIL_OPEN

ANNOTATION_SKIP: Final = SKIP_INJECT_ANNOTATION
ANNOTATION_INJECTED_BY: Final = INJECTED_BY_ANNOTATION
ANNOTATION_INJECTED_BY_UID: Final = "inferencecache.io/injected-by-uid"
ANNOTATION_INJECTED_BY_SIGNATURE: Final = "inferencecache.io/injected-by-signature"
_OUR_ANNOTATIONS: Final = (
    ANNOTATION_INJECTED_BY,
    ANNOTATION_INJECTED_BY_UID,
    ANNOTATION_INJECTED_BY_SIGNATURE,
)

FLAG_KV_EVENTS: Final = "--kv-events-config"
FLAG_KV_TRANSFER: Final = "--kv-transfer-config"
FLAG_HASH_ALGO: Final = "--prefix-caching-hash-algo"
ENV_HASH_SEED: Final = "PYTHONHASHSEED"
ENV_LMCACHE_URL: Final = "LMCACHE_REMOTE_URL"
#: What engineOverrides may not name (the validator forbids them; seed §6.5 rule 8).
RESERVED_ARGS: Final = (FLAG_KV_EVENTS, FLAG_KV_TRANSFER, FLAG_HASH_ALGO)
RESERVED_ENV: Final = (ENV_HASH_SEED, ENV_LMCACHE_URL)

#: vLLM ``--prefix-caching-hash-algo`` values with a deterministic hash (protocols §2.2).
HASH_ALGOS: Final = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
_KV_ROLES: Final = {"ReadOnly": "kv_consumer", "WriteOnly": "kv_producer", "ReadWrite": "kv_both"}
_LMCACHE_TYPES: Final = ("LMCache", "External")
#: (engine, type) pairs with an injection; the validator's supported-pairs message.
SUPPORTED_PAIRS: Final = (("vllm", "External"), ("vllm", "LMCache"), ("vllm", "None"))
_SHELLS: Final = frozenset({"sh", "bash", "ash", "dash", "zsh"})


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """What the Pod webhook injects; one instance for the operator's lifetime."""

    #: The engine container's name; a pod without it gets its first container injected.
    engine_container: str = "vllm"
    #: ``--prefix-caching-hash-algo`` (``sha256_cbor``: language-neutral, vLLM >= 0.10.2).
    hash_algo: str = "sha256_cbor"
    #: The one ``PYTHONHASHSEED`` every engine pod shares (LMCache and llm-d use ``0``).
    python_hash_seed: str = "0"
    #: vLLM's PUB bind address; discovery connects to ``tcp://<podIP>:<port + rank>``.
    kv_events_endpoint: str = "tcp://*:5557"
    #: vLLM's replay ROUTER bind address (port + rank as well).
    kv_events_replay_endpoint: str = "tcp://*:5657"
    #: First ZMQ frame of every batch (subscribers prefix-match; ``""`` matches it).
    kv_events_topic: str = "kv-events"
    #: HMAC key of ``injected-by-signature`` (a mounted Secret); empty: no signature.
    signing_key: bytes = b""

    def __post_init__(self) -> None:
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"hash_algo must be one of {', '.join(HASH_ALGOS)}, got {self.hash_algo!r}")
        if not self.python_hash_seed.isdigit() or int(self.python_hash_seed) > 4294967295:
            raise ValueError(
                f"python_hash_seed must be an integer in [0, 4294967295], got {self.python_hash_seed!r}"
            )
        for name in ("kv_events_endpoint", "kv_events_replay_endpoint"):
            if _port_of(getattr(self, name)) is None:
                raise ValueError(f"{name} must be tcp://*:<port>, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class Mutation:
    """The Pod webhook's answer: always an allow, with these RFC 6902 ops."""

    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: tuple[str, ...] = ()
    #: Why nothing was injected (``None`` when injected); annotations may still be removed.
    skipped_reason: str | None = None


# -- backend selection ------------------------------------------------------------------------


def select_backend(pod: Mapping[str, Any], backends: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The CacheBackend claiming ``pod``: by name, the first whose non-empty
    ``engineSelector.matchLabels`` is a subset of the pod's labels (seed §6.4 step 3)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for cb in sorted(backends, key=lambda b: str((b.get("metadata") or {}).get("name", ""))):
        if (cb.get("metadata") or {}).get("deletionTimestamp"):
            continue
        wanted = ((cb.get("spec") or {}).get("engineSelector") or {}).get("matchLabels") or {}
        if wanted and all(labels.get(k) == v for k, v in wanted.items()):
            return cb
    return None


# -- the Pod mutation ---------------------------------------------------------------------------


def mutate_engine_pod(
    pod: Mapping[str, Any], backend: Mapping[str, Any] | None, settings: WebhookSettings
) -> Mutation:
    """Inject the engine wiring into a pod on CREATE; never raises (fail open).

    ``backend`` is :func:`select_backend`'s result (``None``: no match, nothing injected).
    Any exception becomes an allow with no injection and a warning.
    """
    try:
        return _mutate(pod, backend, settings)
    except Exception as exc:
        reason = f"inference-cache: engine injection skipped (internal error: {type(exc).__name__})"
        try:
            strip = _annotation_ops(pod, {})
        except Exception:
            strip = []
        return Mutation(patch=strip, warnings=(reason,), skipped_reason=reason)


def _skip(pod: Mapping[str, Any], reason: str, warnings: Iterable[str] = ()) -> Mutation:
    return Mutation(patch=_annotation_ops(pod, {}), warnings=tuple(warnings), skipped_reason=reason)


def _mutate(pod: Mapping[str, Any], backend: Mapping[str, Any] | None, settings: WebhookSettings) -> Mutation:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if opted_out(annotations.get(ANNOTATION_SKIP)):
        return _skip(pod, f"the pod opts out ({ANNOTATION_SKIP})")
    if backend is None:
        return _skip(pod, "no CacheBackend selects this pod")
    spec = backend.get("spec") or {}
    meta = backend.get("metadata") or {}
    integration = spec.get("integration") or {}
    engine = str(integration.get("engine") or "vllm").lower()
    if engine != "vllm":
        return _skip(pod, f"engine {engine!r} has no injection (only vllm)")
    containers = (pod.get("spec") or {}).get("containers") or []
    if not containers:
        return _skip(pod, "the pod has no containers")
    index = _engine_index(containers, settings.engine_container)
    container = containers[index]
    command = container.get("command")
    args = container.get("args")
    if _runs_in_shell(command or []):
        return _skip(
            pod,
            f"container {container.get('name')!r} runs its command through a shell; flags cannot be injected",
            [f"inference-cache: container {container.get('name')!r} uses 'sh -c': not injected"],
        )
    argv = _Argv(command, args)
    env = _Env(container.get("env"))
    warnings: list[str] = []

    _inject_kv_events(argv, settings, warnings)
    _inject_hash_settings(argv, env, settings, warnings)
    backend_type = str(spec.get("type") or "LMCache")
    if backend_type != "None":
        _inject_lmcache(argv, env, backend, backend_type, warnings)
    _apply_overrides(argv, env, integration.get("engineOverrides") or {}, warnings)
    _check_data_parallel(argv, settings, warnings)

    base = f"/spec/containers/{index}"
    ops: list[dict[str, Any]] = []
    for key, before, after in (
        ("command", command, argv.command),
        ("args", args, argv.args),
        ("env", container.get("env"), env.items),
    ):
        if after is not None and after != before:
            ops.append({"op": "add", "path": f"{base}/{key}", "value": after})
    ours = {
        ANNOTATION_INJECTED_BY: f"{meta.get('namespace', '')}/{meta.get('name', '')}",
        ANNOTATION_INJECTED_BY_UID: str(meta.get("uid", "")),
    }
    if settings.signing_key:
        material = _signed_material(ours, container.get("name", ""), argv, env)
        ours[ANNOTATION_INJECTED_BY_SIGNATURE] = _sign(settings.signing_key, material)
    ops += _annotation_ops(pod, ours)
    return Mutation(patch=ops, warnings=tuple(warnings))


def _port_of(endpoint: str) -> int | None:
    """``tcp://*:5557`` -> 5557 (vLLM binds ``*``); anything else -> None."""
    match = re.fullmatch(r"tcp://\*:(\d{1,5})", endpoint)
    return int(match.group(1)) if match and 0 < int(match.group(1)) < 65536 else None


def _engine_index(containers: list[dict[str, Any]], name: str) -> int:
    return next((i for i, c in enumerate(containers) if c.get("name") == name), 0)


def _runs_in_shell(command: list[str]) -> bool:
    return bool(command) and command[0].rsplit("/", 1)[-1] in _SHELLS and "-c" in command


def _inject_kv_events(argv: _Argv, settings: WebhookSettings, warnings: list[str]) -> None:
    if argv.has_dotted(FLAG_KV_EVENTS):
        warnings.append(f"inference-cache: the pod sets {FLAG_KV_EVENTS}.<field>; kept as is, not checked")
        return
    present, value = argv.get(FLAG_KV_EVENTS)
    if not present:
        argv.set(FLAG_KV_EVENTS, json.dumps(_kv_events_config(settings), separators=(",", ":")))
        return
    try:
        existing = json.loads(value or "")
    except ValueError:
        existing = None
    if not isinstance(existing, dict):
        warnings.append(f"inference-cache: the pod's {FLAG_KV_EVENTS} is not a JSON object; kept as is")
        return
    expected = _kv_events_config(settings)
    differs = [
        k
        for k in ("enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint")
        if existing.get(k) != expected[k]
    ]
    if differs:
        warnings.append(
            f"inference-cache: kept the pod's {FLAG_KV_EVENTS}; discovery expects other "
            f"{', '.join(differs)} (endpoint {settings.kv_events_endpoint}, replay "
            f"{settings.kv_events_replay_endpoint})"
        )


def _kv_events_config(settings: WebhookSettings) -> dict[str, Any]:
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": settings.kv_events_endpoint,
        "replay_endpoint": settings.kv_events_replay_endpoint,
        "topic": settings.kv_events_topic,
    }


def _inject_hash_settings(argv: _Argv, env: _Env, settings: WebhookSettings, warnings: list[str]) -> None:
    present, value = argv.get(FLAG_HASH_ALGO)
    if not present:
        argv.set(FLAG_HASH_ALGO, settings.hash_algo)
    elif value != settings.hash_algo:
        warnings.append(
            f"inference-cache: the pod keeps {FLAG_HASH_ALGO} {value}; the fleet uses {settings.hash_algo}"
        )
    current = env.get(ENV_HASH_SEED)
    if current is None:
        env.set(ENV_HASH_SEED, settings.python_hash_seed)
    elif current.get("value") != settings.python_hash_seed:
        warnings.append(
            f"inference-cache: the pod keeps its own {ENV_HASH_SEED}; pods with different seeds "
            "do not share LMCache chunks"
        )


def _inject_lmcache(
    argv: _Argv, env: _Env, backend: Mapping[str, Any], backend_type: str, warnings: list[str]
) -> None:
    spec = backend.get("spec") or {}
    if backend_type not in _LMCACHE_TYPES:
        warnings.append(
            f"inference-cache: backend type {backend_type!r} has no engine injection; KV events only"
        )
        return
    raw = (
        spec.get("endpoint") if backend_type == "External" else (backend.get("status") or {}).get("endpoint")
    )
    endpoint = str(raw or "").strip()
    if not endpoint:
        warnings.append(
            "inference-cache: the CacheBackend has no endpoint yet; LMCache settings not injected"
        )
        return
    if endpoint.lower().startswith("lm://"):
        endpoint = endpoint[len("lm://") :]
    integration = spec.get("integration") or {}
    role = _KV_ROLES.get(str(integration.get("role") or "ReadWrite"), "kv_both")
    transfer = {"kv_connector": "LMCacheConnectorV1", "kv_role": role}
    argv.set(FLAG_KV_TRANSFER, json.dumps(transfer, separators=(",", ":")))
    config = spec.get("backendConfig") or {}
    for name, value in (
        (ENV_LMCACHE_URL, f"lm://{endpoint}"),
        ("LMCACHE_REMOTE_SERDE", config.get("remoteSerde") or "naive"),
        ("LMCACHE_CHUNK_SIZE", config.get("chunkSize") or "256"),
        ("LMCACHE_LOCAL_CPU", config.get("localCPU") or "False"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", config.get("maxLocalCPU") or "20"),
    ):
        env.set(name, str(value))


def _apply_overrides(argv: _Argv, env: _Env, overrides: Mapping[str, Any], warnings: list[str]) -> None:
    """seed §6.4 engineOverrides: suppressArgs, args, suppressEnv, env, in that order."""
    for flag in overrides.get("suppressArgs") or []:
        if _flag_of(flag) in argv.owned:
            argv.remove(_flag_of(flag) or flag)
    for tokens in _group_flags(list(overrides.get("args") or [])):
        flag = _flag_of(tokens[0])
        if flag is None:
            argv.append(tokens)
        elif flag in argv.owned:
            argv.set(flag, tokens[1] if len(tokens) > 1 else _inline_value(tokens[0]))
        elif argv.get(flag)[0]:
            warnings.append(f"inference-cache: engineOverrides.args {flag}: the pod sets it; left as is")
        else:
            argv.append(tokens)
    for name in overrides.get("suppressEnv") or []:
        if name in env.owned:
            env.remove(name)
    for var in overrides.get("env") or []:
        name = var.get("name", "")
        if name in env.owned or env.get(name) is None:
            env.put(dict(var))
        else:
            warnings.append(f"inference-cache: engineOverrides.env {name}: the pod sets it; left as is")


def _check_data_parallel(argv: _Argv, settings: WebhookSettings, warnings: list[str]) -> None:
    _, raw = argv.get("--data-parallel-size")
    if raw is None:
        _, raw = argv.get("-dp")
    if raw is None or not raw.isdigit():
        return
    gap = abs(
        (_port_of(settings.kv_events_replay_endpoint) or 0) - (_port_of(settings.kv_events_endpoint) or 0)
    )
    if int(raw) > gap:
        warnings.append(
            f"inference-cache: --data-parallel-size {raw}: vLLM offsets the KV-event ports by rank and "
            f"the PUB and replay ports are only {gap} apart; ranks would collide"
        )


# -- argv and env editing -----------------------------------------------------------------------


def _flag_of(token: str) -> str | None:
    """``--a_b=x`` -> ``--a-b`` (vLLM accepts underscores); ``-dp`` -> ``-dp``; non-flags -> None."""
    if token.startswith("--") and len(token) > 2:
        return "--" + token[2:].split("=", 1)[0].replace("_", "-")
    if token.startswith("-") and len(token) > 1 and not token[1].isdigit():
        return token.split("=", 1)[0]
    return None


def _inline_value(token: str) -> str | None:
    return token.split("=", 1)[1] if "=" in token else None


def _takes_next(tokens: list[str], i: int) -> bool:
    return "=" not in tokens[i] and i + 1 < len(tokens) and _flag_of(tokens[i + 1]) is None


def _group_flags(tokens: list[str]) -> list[list[str]]:
    """``[--a, 1, --b=2, --c, pos]`` -> ``[[--a, 1], [--b=2], [--c, pos]]``."""
    groups: list[list[str]] = []
    i = 0
    while i < len(tokens):
        width = 2 if _flag_of(tokens[i]) is not None and _takes_next(tokens, i) else 1
        groups.append(tokens[i : i + width])
        i += width
    return groups


class _Argv:
    """The engine container's ``command`` + ``args``; flags are edited where they are."""

    def __init__(self, command: list[str] | None, args: list[str] | None) -> None:
        self.command = None if command is None else list(command)
        self.args = None if args is None else list(args)
        #: Flags the injection wrote (engineOverrides may replace or suppress only these).
        self.owned: set[str] = set()

    def _lists(self) -> list[list[str]]:
        return [lst for lst in (self.command, self.args) if lst is not None]

    def _find(self, flag: str) -> list[tuple[list[str], int, int]]:
        """Every occurrence as (list, index, width); width 2 = ``--flag value``."""
        hits = []
        for lst in self._lists():
            for i, token in enumerate(lst):
                if _flag_of(token) == flag:
                    hits.append((lst, i, 2 if _takes_next(lst, i) else 1))
        return hits

    def get(self, flag: str) -> tuple[bool, str | None]:
        """(present, value of the last occurrence, as argparse reads it)."""
        hits = self._find(flag)
        if not hits:
            return False, None
        lst, i, width = hits[-1]
        return True, lst[i + 1] if width == 2 else _inline_value(lst[i])

    def has_dotted(self, flag: str) -> bool:
        return any(token.replace("_", "-").startswith(flag + ".") for lst in self._lists() for token in lst)

    def set(self, flag: str, value: str | None) -> None:
        """Replace the first occurrence in place (two-token form), drop the others, or append."""
        tokens = [flag] if value is None else [flag, value]
        hits = self._find(flag)
        self.owned.add(flag)
        if not hits:
            self.append(tokens)
            return
        first_list, first_index, _ = hits[0]
        for lst, i, width in reversed(hits):
            del lst[i : i + width]
        first_list[first_index:first_index] = tokens

    def remove(self, flag: str) -> None:
        for lst, i, width in reversed(self._find(flag)):
            del lst[i : i + width]

    def append(self, tokens: list[str]) -> None:
        if self.args is None:
            self.args = []
        self.args.extend(tokens)


class _Env:
    """The engine container's ``env`` list, upserted by name in place."""

    def __init__(self, items: list[dict[str, Any]] | None) -> None:
        self.items: list[dict[str, Any]] | None = None if items is None else [dict(v) for v in items]
        #: Variables the injection wrote.
        self.owned: set[str] = set()

    def get(self, name: str) -> dict[str, Any] | None:
        return next((v for v in self.items or [] if v.get("name") == name), None)

    def set(self, name: str, value: str) -> None:
        self.owned.add(name)
        self.put({"name": name, "value": value})

    def put(self, var: dict[str, Any]) -> None:
        if self.items is None:
            self.items = []
        for i, v in enumerate(self.items):
            if v.get("name") == var.get("name"):
                self.items[i] = var
                return
        self.items.append(var)

    def remove(self, name: str) -> None:
        if self.items is not None:
            self.items = [v for v in self.items if v.get("name") != name]


# -- annotations and the signature --------------------------------------------------------------


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _annotation_ops(pod: Mapping[str, Any], ours: Mapping[str, str]) -> list[dict[str, Any]]:
    """Ops leaving exactly ``ours`` among our annotations (removing forged or stale ones)."""
    meta = pod.get("metadata")
    current = (meta or {}).get("annotations")
    if current is None:
        if not ours:
            return []
        if meta is None:
            return [{"op": "add", "path": "/metadata", "value": {"annotations": dict(ours)}}]
        return [{"op": "add", "path": "/metadata/annotations", "value": dict(ours)}]
    ops: list[dict[str, Any]] = []
    for key in _OUR_ANNOTATIONS:
        path = f"/metadata/annotations/{_pointer(key)}"
        if key in ours and current.get(key) != ours[key]:
            ops.append({"op": "add", "path": path, "value": ours[key]})
        elif key not in ours and key in current:
            ops.append({"op": "remove", "path": path})
    return ops


def _signed_material(ours: Mapping[str, str], container: str, argv: _Argv, env: _Env) -> bytes:
    flags = {flag: argv.get(flag)[1] for flag in RESERVED_ARGS if argv.get(flag)[0]}
    variables = {
        str(v.get("name")): v.get("value")
        for v in env.items or []
        if v.get("name") == ENV_HASH_SEED or str(v.get("name", "")).startswith("LMCACHE_")
    }
    material = {
        "injectedBy": ours.get(ANNOTATION_INJECTED_BY),
        "uid": ours.get(ANNOTATION_INJECTED_BY_UID),
        "container": container,
        "flags": flags,
        "env": variables,
    }
    return json.dumps(material, sort_keys=True, separators=(",", ":")).encode()


def _sign(key: bytes, material: bytes) -> str:
    return "v1:" + hmac.new(key, material, hashlib.sha256).hexdigest()


def verify_injection(pod: Mapping[str, Any], settings: WebhookSettings) -> bool:
    """Whether ``pod``'s injected-by annotations are ours: the signature matches the backend
    reference, the uid and the live values of the settings we manage. False without a key."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    signature = annotations.get(ANNOTATION_INJECTED_BY_SIGNATURE)
    containers = (pod.get("spec") or {}).get("containers") or []
    if not settings.signing_key or not isinstance(signature, str) or not containers:
        return False
    container = containers[_engine_index(containers, settings.engine_container)]
    ours = {k: str(annotations.get(k, "")) for k in (ANNOTATION_INJECTED_BY, ANNOTATION_INJECTED_BY_UID)}
    material = _signed_material(
        ours,
        container.get("name", ""),
        _Argv(container.get("command"), container.get("args")),
        _Env(container.get("env")),
    )
    return hmac.compare_digest(signature, _sign(settings.signing_key, material))


# -- AdmissionReview v1 -------------------------------------------------------------------------


def admission_review_response(
    review: Mapping[str, Any], mutate: Callable[[Mapping[str, Any]], Mutation]
) -> dict[str, Any]:
    """AdmissionReview v1 in -> out for the Pod webhook: the uid echoed, always allowed,
    ``mutate(request)``'s ops as a base64 JSONPatch, its warnings (fail open on any error)."""
    request = review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    try:
        mutation = mutate(request)
    except Exception as exc:
        mutation = Mutation(warnings=(f"inference-cache: engine injection skipped ({type(exc).__name__})",))
    if mutation.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(mutation.patch).encode()).decode("ascii")
    if mutation.warnings:
        response["warnings"] = list(mutation.warnings)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


# -- CRD admission (seed §6.5 + the gateway rules of issue #7) ----------------------------------

ErrorType = Literal["Required", "Invalid", "Forbidden", "Duplicate"]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One admission error, shaped like Kubernetes' ``field.Error``."""

    type: ErrorType
    field: str
    detail: str
    value: str = ""

    def __str__(self) -> str:
        shown = {"Required": "Required value", "Duplicate": "Duplicate value"}.get(self.type, self.type)
        value = f" {self.value!r}" if self.value and self.type != "Required" else ""
        return f"{self.field}: {shown}{value}: {self.detail}"


def format_errors(kind: str, name: str, errors: Iterable[FieldError]) -> str:
    """The denial message: ``CacheBackend "x" is invalid: [a, b]`` (the apiserver's shape)."""
    return f'{kind} "{name}" is invalid: [{", ".join(str(e) for e in errors)}]'


def default_cache_backend(obj: Mapping[str, Any], crd: Mapping[str, Any]) -> list[dict[str, Any]]:
    """RFC 6902 ops defaulting a CacheBackend from its CRD (``crds.cache_backend()``), the one
    source of the defaults; never overwrites a set value.

    The apiserver applies a structural default only inside an object that exists; this fills
    absent objects too (``spec.integration``, ``spec.gateway``: any object schema without
    required fields), then the one webhook-only default: ``autoscaling.minReplicas =
    spec.replicas`` when ``replicas >= 1`` (seed §6.5)."""
    out = copy.deepcopy(dict(obj))
    ops: list[dict[str, Any]] = []
    spec_schema = _version_schema(crd, str(obj.get("apiVersion", "")))["properties"]["spec"]
    if not isinstance(out.get("spec"), dict):
        out["spec"] = {}
        ops.append({"op": "add", "path": "/spec", "value": {}})
    _fill_defaults(out["spec"], spec_schema, "/spec", ops)
    spec = out["spec"]
    autoscaling = spec.get("autoscaling")
    replicas = spec.get("replicas")
    wants_floor = isinstance(autoscaling, dict) and autoscaling.get("minReplicas") is None
    if wants_floor and isinstance(replicas, int) and replicas >= 1:
        ops.append({"op": "add", "path": "/spec/autoscaling/minReplicas", "value": replicas})
    return ops


def _version_schema(crd: Mapping[str, Any], api_version: str) -> Mapping[str, Any]:
    versions = crd["spec"]["versions"]
    wanted = api_version.rpartition("/")[2]
    chosen = next((v for v in versions if v["name"] == wanted), None)
    chosen = chosen or next(v for v in versions if v.get("storage"))
    schema: Mapping[str, Any] = chosen["schema"]["openAPIV3Schema"]
    return schema


def _fill_defaults(
    value: dict[str, Any], schema: Mapping[str, Any], path: str, ops: list[dict[str, Any]]
) -> None:
    for key, sub in (schema.get("properties") or {}).items():
        where = f"{path}/{_pointer(key)}"
        if key in value:
            if isinstance(value[key], dict) and sub.get("type") == "object":
                _fill_defaults(value[key], sub, where, ops)
            continue
        default = _absent_default(sub)
        if default is not None:
            value[key] = default
            ops.append({"op": "add", "path": where, "value": copy.deepcopy(default)})


def _absent_default(schema: Mapping[str, Any]) -> Any:
    """The value an absent field takes: its ``default``, or for an object without required
    fields the defaults of its properties (``None``: stays absent)."""
    if "default" in schema:
        return copy.deepcopy(schema["default"])
    if schema.get("type") != "object" or schema.get("required"):
        return None
    inner = {
        k: d for k, sub in (schema.get("properties") or {}).items() if (d := _absent_default(sub)) is not None
    }
    return inner or None


def validate_cache_backend(obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[FieldError]:
    """CacheBackend rules; on UPDATE (``old`` given) only errors the update introduces."""
    errors = _cache_backend_errors(obj)
    if old is not None:
        before = set(_cache_backend_errors(old))
        errors = [e for e in errors if e not in before]
    return errors


def _cache_backend_errors(obj: Mapping[str, Any]) -> list[FieldError]:
    spec = obj.get("spec") or {}
    namespace = str((obj.get("metadata") or {}).get("namespace", ""))
    errors: list[FieldError] = []
    kind = str(spec.get("type") or "LMCache")
    endpoint = str(spec.get("endpoint") or "").strip()
    if kind == "External" and not endpoint:
        errors.append(FieldError("Required", "spec.endpoint", "required when spec.type is External"))
    if kind != "External" and endpoint:
        errors.append(
            FieldError("Invalid", "spec.endpoint", "only allowed when spec.type is External", endpoint)
        )
    if kind == "External" and endpoint:
        shape = endpoint_shape_error(endpoint)
        if shape:
            errors.append(FieldError("Invalid", "spec.endpoint", shape, endpoint))
    if (spec.get("storage") or {}).get("pvc") is not None and kind in ("AIBrix", "NIXL"):
        errors.append(FieldError("Forbidden", "spec.storage.pvc", f"type {kind} is memory-only"))
    other = _endpoint_namespace(endpoint) if endpoint else None
    if other is not None and other != namespace and not spec.get("allowCrossNamespace"):
        errors.append(
            FieldError(
                "Forbidden",
                "spec.endpoint",
                f"points into namespace {other!r}; set spec.allowCrossNamespace to allow it",
                endpoint,
            )
        )
    autoscaling = spec.get("autoscaling")
    if spec.get("replicas") == 0 and autoscaling is not None and autoscaling.get("minReplicas") is None:
        errors.append(
            FieldError(
                "Required",
                "spec.autoscaling.minReplicas",
                "required when spec.replicas is 0 with autoscaling",
            )
        )
    integration = spec.get("integration") or {}
    engine = str(integration.get("engine") or "vllm").lower()
    supported = (engine, kind) in SUPPORTED_PAIRS
    if not supported:
        pairs = ", ".join(f"{e}/{t}" for e, t in SUPPORTED_PAIRS)
        errors.append(
            FieldError(
                "Invalid",
                "spec.integration.engine",
                f'no runtime adapter supports the (engine="{engine}", backend="{kind}") pair; '
                f"supported pairs in this build: {pairs}",
                engine,
            )
        )
    errors += _override_errors(integration.get("engineOverrides") or {}, check_reserved=supported)
    errors += _gateway_errors(spec.get("gateway") or {})
    return errors


_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_ENV_SOURCES: Final = ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef", "fileKeyRef")


def _override_errors(overrides: Mapping[str, Any], *, check_reserved: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    base = "spec.integration.engineOverrides"
    for i, var in enumerate(overrides.get("env") or []):
        name = str(var.get("name") or "")
        where = f"{base}.env[{i}]"
        if not name:
            errors.append(FieldError("Required", f"{where}.name", "an environment variable needs a name"))
        elif not _ENV_NAME.match(name):
            errors.append(
                FieldError("Invalid", f"{where}.name", "not a valid environment variable name", name)
            )
        source = var.get("valueFrom")
        if var.get("value") is not None and source is not None:
            errors.append(FieldError("Invalid", f"{where}.valueFrom", "may not be set when value is set"))
        if source is not None and sum(1 for s in _ENV_SOURCES if source.get(s) is not None) != 1:
            errors.append(FieldError("Invalid", f"{where}.valueFrom", "must name exactly one source"))
    if not check_reserved:
        return errors
    for key in ("args", "suppressArgs"):
        for i, token in enumerate(overrides.get(key) or []):
            flag = _flag_of(str(token))
            if flag in RESERVED_ARGS:
                errors.append(
                    FieldError("Forbidden", f"{base}.{key}[{i}]", "managed by inference-cache", str(flag))
                )
    for i, var in enumerate(overrides.get("env") or []):
        if var.get("name") in RESERVED_ENV:
            errors.append(
                FieldError(
                    "Forbidden", f"{base}.env[{i}].name", "managed by inference-cache", str(var["name"])
                )
            )
    for i, name in enumerate(overrides.get("suppressEnv") or []):
        if name in RESERVED_ENV:
            errors.append(
                FieldError("Forbidden", f"{base}.suppressEnv[{i}]", "managed by inference-cache", name)
            )
    return errors


def _gateway_errors(gateway: Mapping[str, Any]) -> list[FieldError]:
    mode = gateway.get("mode") or "None"
    fail_open = gateway.get("failOpen", DEFAULT_FAIL_OPEN)
    errors: list[FieldError] = []
    if (gateway.get("bodyMode") or DEFAULT_BODY_MODE) == "FullDuplexStreamed" and fail_open is not False:
        errors.append(
            FieldError(
                "Invalid",
                "spec.gateway.failOpen",
                "must be false with bodyMode FullDuplexStreamed (Envoy cannot fail open on a streamed body)",
                "true",
            )
        )
    if mode in ("InferencePool", "EnvoyGateway") and not str(gateway.get("modelName") or "").strip():
        errors.append(
            FieldError(
                "Required",
                "spec.gateway.modelName",
                f"the OpenAI model name is required with mode {mode}",
            )
        )
    if mode == "EnvoyGateway" and not str((gateway.get("httpRouteRef") or {}).get("name") or "").strip():
        errors.append(
            FieldError(
                "Required",
                "spec.gateway.httpRouteRef.name",
                "the HTTPRoute to attach to is required with mode EnvoyGateway",
            )
        )
    return errors


def _endpoint_namespace(endpoint: str) -> str | None:
    """The namespace of a ``<svc>.<ns>.svc[.cluster.local]`` endpoint, else ``None``."""
    host = endpoint.strip().lower()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0]
    host = (
        host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
    )
    host = host.rstrip(".").removesuffix(".cluster.local")
    labels = host.split(".")
    if len(labels) >= 3 and labels[-1] == "svc":
        return labels[-2]
    return None


def validate_cache_policy(
    obj: Mapping[str, Any], existing: Iterable[Mapping[str, Any]], old: Mapping[str, Any] | None = None
) -> list[FieldError]:
    """CachePolicy: ``evictionTTL`` > 0 when set; on CREATE (``old`` is None) one per namespace
    (``existing`` = the namespace's CachePolicies); on UPDATE only new spec errors."""
    errors = _policy_spec_errors(obj)
    if old is not None:
        before = set(_policy_spec_errors(old))
        return [e for e in errors if e not in before]
    name = (obj.get("metadata") or {}).get("name")
    others = sorted(str((p.get("metadata") or {}).get("name")) for p in existing)
    others = [n for n in others if n != name]
    if others:
        namespace = (obj.get("metadata") or {}).get("namespace", "")
        errors.append(
            FieldError(
                "Forbidden",
                "metadata.name",
                f"namespace {namespace!r} already has CachePolicy {others[0]!r}; "
                "only one CachePolicy per namespace is allowed (edit that one instead)",
            )
        )
    return errors


def _policy_spec_errors(obj: Mapping[str, Any]) -> list[FieldError]:
    ttl = (obj.get("spec") or {}).get("evictionTTL")
    if ttl is None:
        return []
    try:
        positive = parse_duration(str(ttl)) > 0
    except ValueError:
        positive = False
    if positive:
        return []
    return [FieldError("Invalid", "spec.evictionTTL", "must be a positive duration (e.g. 30m)", str(ttl))]


def validate_cache_tenant(
    obj: Mapping[str, Any], existing: Iterable[Mapping[str, Any]], old: Mapping[str, Any] | None = None
) -> list[FieldError]:
    """CacheTenant: ``tenantID`` unique within the namespace (``existing`` = its CacheTenants),
    checked on CREATE and on an UPDATE that changes it; other namespaces may reuse it."""
    tenant = (obj.get("spec") or {}).get("tenantID")
    if old is not None and (old.get("spec") or {}).get("tenantID") == tenant:
        return []
    name = (obj.get("metadata") or {}).get("name")
    clashes = sorted(
        str((t.get("metadata") or {}).get("name"))
        for t in existing
        if (t.get("metadata") or {}).get("name") != name and (t.get("spec") or {}).get("tenantID") == tenant
    )
    if not clashes:
        return []
    return [
        FieldError(
            "Invalid",
            "spec.tenantID",
            f"already used by CacheTenant {clashes[0]!r} in this namespace",
            str(tenant),
        )
    ]
