"""The ``/policy`` wire format (schema versions 3 to 7): strict decoder and v7 encoder.

Owner: ``inference_cache.extproc`` (the server's controller-facing HTTP seam). The operator
PUSHES a full replace-on-write snapshot to ``POST /policy``; ``extproc.http`` reads the
body, calls :func:`decode` and hands the result to ``index.policy.PolicyStore.replace``.
:func:`encode` is the operator side (and the tests' round trip).

Contract (the original's ``internal/controlplaneapi/policy.go`` + ``internal/server/policy.go``,
``docs/design/policy-propagation.md``)::

    {"version": 7,
     "policies": [{"namespace": "team-a", "evictionTTL": 900000000000,   # Go Duration, ns
                   "minimumPrefixTokens": 32, "minimumMatchedTokens": 128,
                   "routingFloorScore": 5, "lookupTimeoutMs": 25,           # float32 JSON number
                   "eviction": "lfu", "affinityRouting": true,             # JSON bool
                   "strategy": {"enableChainMatching": true, "requireChain": false,
                                "enableTenantHot": true}}],
     "tenants": [{"tenantID": "team-a", "maxIndexEntries": 100000, "isolationMode": "Fairness"}]}

* Every field of the v7 schema is accepted in any accepted version (the original decodes
  into the v7 struct with ``DisallowUnknownFields``); an unknown field, a wrong JSON type,
  a non-integral or out-of-range integer is a :class:`PolicyDecodeError` naming the field.
  ``null`` means "absent", as Go's decoder treats it.
* ``version`` outside ``[3, 7]`` is rejected with ``unsupported policy snapshot version``.
* Absent optional fields take the v7 zero/nil meaning: ``minimumMatchedTokens`` absent is
  ``0`` (the explicit opt-out, because the Go field is ``omitempty``), ``routingFloorScore``
  absent resolves to 0.1, ``affinityRouting`` absent to ``true``, strategy gates absent to
  ``true``/``false``/``true``. Older bodies are normalised as the original does: v3 turns a
  ``0`` ``minimumMatchedTokens`` into 64 (the field did not exist yet).
* Trust-boundary clamps the original applies in its resolvers are applied here once:
  negative ``minimumMatchedTokens`` and ``routingFloorScore`` become 0; the eviction name is
  lower-cased and anything but ``"lfu"`` is LRU. (Empty namespaces/tenant ids and negative
  quotas are the store's business: ``PolicyStore.replace``.)
* Field names are matched case-sensitively (Go's decoder would also accept ``Namespace``;
  we deliberately do not) and a body must be exactly one JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, NoReturn

from inference_cache.index.policy import NamespacePolicy, StrategyGates, TenantQuota

#: The schema version this encoder writes (``PolicyPropagationVersion``).
POLICY_PROPAGATION_VERSION: Final = 7
#: The oldest schema the decoder accepts (``PolicyMinimumAcceptedVersion``).
POLICY_MINIMUM_ACCEPTED_VERSION: Final = 3

#: Shared wire defaults (``controlplaneapi.Default*``).
DEFAULT_MINIMUM_MATCHED_TOKENS: Final = 64
DEFAULT_ROUTING_FLOOR_SCORE: Final = 0.1
DEFAULT_AFFINITY_ROUTING: Final = True
DEFAULT_STRATEGY: Final = StrategyGates(
    enable_chain_matching=True, require_chain=False, enable_tenant_hot=True
)
#: ``tenants[].isolationMode`` when absent (the only implemented mode).
DEFAULT_ISOLATION_MODE: Final = "Fairness"

_INT32: Final = (-(2**31), 2**31 - 1)
_INT64: Final = (-(2**63), 2**63 - 1)
_FLOAT32_MAX: Final = 3.4028234663852886e38
_NS_PER_S: Final = 1_000_000_000


class PolicyDecodeError(ValueError):
    """A ``/policy`` body that must be refused with HTTP 400; ``str()`` is the reason."""


class UnsupportedPolicyVersionError(PolicyDecodeError):
    """A well-formed body whose ``version`` is outside ``[3, 7]``."""

    def __init__(self) -> None:
        super().__init__("unsupported policy snapshot version")


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """One decoded ``/policy`` body, ready for ``PolicyStore.replace(policies, tenants)``."""

    version: int
    policies: tuple[NamespacePolicy, ...]
    tenants: tuple[TenantQuota, ...]


# -- decoding -----------------------------------------------------------------------


def _fail(path: str, message: str) -> NoReturn:
    raise PolicyDecodeError(f"{path}: {message}")


def _reject_constant(name: str) -> NoReturn:
    raise PolicyDecodeError(f"invalid JSON number {name}")


def _object(value: object, path: str, known: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        _fail(path, f"expected an object, got {_json_type(value)}")
    allowed = frozenset(known)
    for key in value:
        if key not in allowed:
            where = f" in {path}" if path else ""
            raise PolicyDecodeError(f'unknown field "{key}"{where}')
    return {k: v for k, v in value.items() if v is not None}


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "bool"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case _:
            return "object"


def _int(obj: Mapping[str, Any], key: str, path: str, bounds: tuple[int, int], default: int = 0) -> int:
    if key not in obj:
        return default
    value = obj[key]
    where = f"{path}.{key}" if path else key
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, f"expected an integer, got {_json_type(value)} {json.dumps(value)}")
    if not bounds[0] <= value <= bounds[1]:
        _fail(where, f"integer {value} out of range")
    return value


def _float32(obj: Mapping[str, Any], key: str, path: str, default: float) -> float:
    if key not in obj:
        return default
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"{path}.{key}", f"expected a number, got {_json_type(value)} {json.dumps(value)}")
    if abs(value) > _FLOAT32_MAX:
        _fail(f"{path}.{key}", f"number {value} out of float32 range")
    return float(value)


def _bool(obj: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    if key not in obj:
        return default
    value = obj[key]
    if not isinstance(value, bool):
        _fail(f"{path}.{key}", f"expected a bool, got {_json_type(value)} {json.dumps(value)}")
    return value


def _str(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        _fail(f"{path}.{key}", f"expected a string, got {_json_type(value)} {json.dumps(value)}")
    return value


def _array(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        _fail(key, f"expected an array, got {_json_type(value)}")
    return value


_STRATEGY_FIELDS: Final = ("enableChainMatching", "requireChain", "enableTenantHot")
_POLICY_FIELDS: Final = (
    "namespace",
    "evictionTTL",
    "minimumPrefixTokens",
    "minimumMatchedTokens",
    "routingFloorScore",
    "lookupTimeoutMs",
    "affinityRouting",
    "eviction",
    "strategy",
)
_TENANT_FIELDS: Final = ("tenantID", "maxIndexEntries", "isolationMode")
_SNAPSHOT_FIELDS: Final = ("version", "policies", "tenants")


def _strategy(value: object, path: str) -> StrategyGates:
    obj = _object(value, path, _STRATEGY_FIELDS)
    return StrategyGates(
        enable_chain_matching=_bool(obj, "enableChainMatching", path, DEFAULT_STRATEGY.enable_chain_matching),
        require_chain=_bool(obj, "requireChain", path, DEFAULT_STRATEGY.require_chain),
        enable_tenant_hot=_bool(obj, "enableTenantHot", path, DEFAULT_STRATEGY.enable_tenant_hot),
    )


def _policy(value: object, path: str, version: int) -> NamespacePolicy:
    obj = _object(value, path, _POLICY_FIELDS)
    matched = _int(obj, "minimumMatchedTokens", path, _INT32)
    if version < 4 and matched == 0:
        # v3 had no such field: a zero is "absent", not the v4+ explicit opt-out.
        matched = DEFAULT_MINIMUM_MATCHED_TOKENS
    eviction = _str(obj, "eviction", path).lower()
    return NamespacePolicy(
        namespace=_str(obj, "namespace", path),
        eviction_ttl_s=_int(obj, "evictionTTL", path, _INT64) / _NS_PER_S,
        minimum_prefix_tokens=_int(obj, "minimumPrefixTokens", path, _INT32),
        minimum_matched_tokens=max(0, matched),
        routing_floor_score=max(0.0, _float32(obj, "routingFloorScore", path, DEFAULT_ROUTING_FLOOR_SCORE)),
        lookup_timeout_ms=_int(obj, "lookupTimeoutMs", path, _INT32),
        affinity_routing=_bool(obj, "affinityRouting", path, DEFAULT_AFFINITY_ROUTING),
        eviction="lfu" if eviction == "lfu" else "lru",
        strategy=_strategy(obj["strategy"], f"{path}.strategy") if "strategy" in obj else DEFAULT_STRATEGY,
    )


def _tenant(value: object, path: str) -> TenantQuota:
    obj = _object(value, path, _TENANT_FIELDS)
    return TenantQuota(
        tenant_id=_str(obj, "tenantID", path),
        max_index_entries=_int(obj, "maxIndexEntries", path, _INT64),
        isolation_mode=_str(obj, "isolationMode", path) or DEFAULT_ISOLATION_MODE,
    )


def decode(body: bytes | str) -> PolicySnapshot:
    """Decode one ``/policy`` body (versions 3-7) or raise :class:`PolicyDecodeError`."""
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise PolicyDecodeError(f"body is not UTF-8: {e.reason}") from e
    except json.JSONDecodeError as e:
        raise PolicyDecodeError(f"invalid JSON: {e}") from e
    root = _object(raw, "", _SNAPSHOT_FIELDS)
    version = _int(root, "version", "", _INT64)
    if not POLICY_MINIMUM_ACCEPTED_VERSION <= version <= POLICY_PROPAGATION_VERSION:
        raise UnsupportedPolicyVersionError
    return PolicySnapshot(
        version=version,
        policies=tuple(_policy(p, f"policies[{i}]", version) for i, p in enumerate(_array(root, "policies"))),
        tenants=tuple(_tenant(t, f"tenants[{i}]") for i, t in enumerate(_array(root, "tenants"))),
    )


# -- encoding -----------------------------------------------------------------------


def _policy_json(p: NamespacePolicy) -> dict[str, Any]:
    # Mirrors the Go struct tags: omitempty scalars are dropped at zero; the pointer
    # fields (routingFloorScore, affinityRouting, strategy) are always sent, as the
    # operator sends CRD-defaulted values.
    out: dict[str, Any] = {"namespace": p.namespace}
    optional: tuple[tuple[str, int], ...] = (
        ("evictionTTL", round(p.eviction_ttl_s * _NS_PER_S)),
        ("minimumPrefixTokens", p.minimum_prefix_tokens),
        ("minimumMatchedTokens", p.minimum_matched_tokens),
    )
    out.update((k, v) for k, v in optional if v)
    out["routingFloorScore"] = p.routing_floor_score
    if p.lookup_timeout_ms:
        out["lookupTimeoutMs"] = p.lookup_timeout_ms
    out["affinityRouting"] = p.affinity_routing
    out["eviction"] = p.eviction
    out["strategy"] = {
        "enableChainMatching": p.strategy.enable_chain_matching,
        "requireChain": p.strategy.require_chain,
        "enableTenantHot": p.strategy.enable_tenant_hot,
    }
    return out


def _tenant_json(t: TenantQuota) -> dict[str, Any]:
    return {
        "tenantID": t.tenant_id,
        "maxIndexEntries": t.max_index_entries,
        "isolationMode": t.isolation_mode,
    }


def encode(policies: Iterable[NamespacePolicy], tenants: Iterable[TenantQuota] = ()) -> bytes:
    """Encode a full v7 snapshot, policies sorted by namespace and tenants by id."""
    body: dict[str, Any] = {
        "version": POLICY_PROPAGATION_VERSION,
        "policies": [_policy_json(p) for p in sorted(policies, key=attrgetter("namespace"))],
    }
    tenant_list = [_tenant_json(t) for t in sorted(tenants, key=attrgetter("tenant_id"))]
    if tenant_list:
        body["tenants"] = tenant_list
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
