"""Control-plane loops as pure functions: the ``/policy`` push and the ``/snapshot`` poll.

Owner: ``inference_cache.operator`` (seed §6.6-6.7). Data flow, operator -> server: on any
CachePolicy/CacheTenant change and every 30 s the handler lists both kinds, builds
:func:`policy_payload` (schema version 7, exactly what ``extproc.policy_wire.decode``
accepts) and POSTs it to the server's ``/policy`` when :func:`push_due` says so. Server ->
cluster: every 30 s the poller GETs ``/snapshot`` (``index.snapshot`` wire format) and
derives

* :func:`cacheindex_status` -> ``CacheIndex/cluster-default`` ``status``;
* :func:`backend_participation` -> per-CacheBackend ``status.indexParticipation`` (which
  opens the first-KV-event gate of ``operator.backend``);
* :func:`tenant_statuses` -> per-CacheTenant ``status``.

Deviation from the original: snapshot rows are attributed to pods by **pod IP** (our
replica ids are ``ip:port``, the engine's HTTP address), not by pod name. A row whose
tenant is non-empty must also match the pod's namespace (discovery sets tenant = namespace).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from inference_cache.extproc import policy_wire
from inference_cache.index import policy as index_policy
from inference_cache.index import snapshot as snapshot_wire
from inference_cache.operator.backend import (
    INJECTED_BY_ANNOTATION,
    Obj,
    format_time,
    make_condition,
    match_labels,
    parse_duration,
    parse_time,
    selects,
)

#: The singleton CacheIndex the poller maintains.
CACHE_INDEX_NAME: Final = "cluster-default"
#: Re-push the full policy snapshot at least this often, seconds (``--cachepolicy-push-interval``).
PUSH_INTERVAL_S: Final = 30.0

# -- /policy ----------------------------------------------------------------------------


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace", ""), meta.get("name", ""))


def _affinity(value: object) -> bool:
    # The CRD spells it Enabled/Disabled; a bool is accepted too.
    if isinstance(value, str):
        return value.lower() != "disabled"
    return value is not False


def _namespace_policy(cr: Mapping[str, Any]) -> index_policy.NamespacePolicy:
    spec = cr.get("spec") or {}
    default = index_policy.NamespacePolicy()
    strategy = spec.get("strategy") or {}
    ttl = spec.get("evictionTTL")
    floor = spec.get("routingFloorScore")
    return index_policy.NamespacePolicy(
        namespace=_key(cr)[0],
        eviction_ttl_s=max(0.0, parse_duration(ttl)) if ttl else 0.0,
        minimum_prefix_tokens=int(spec.get("minimumPrefixTokens") or 0),
        minimum_matched_tokens=int(spec.get("minimumMatchedTokens", default.minimum_matched_tokens)),
        routing_floor_score=float(floor) if floor is not None else default.routing_floor_score,
        lookup_timeout_ms=int(spec.get("lookupTimeoutMs") or 0),
        affinity_routing=_affinity(spec.get("affinityRouting", True)),
        eviction=(spec.get("eviction") or "LRU").lower(),
        strategy=index_policy.StrategyGates(
            enable_chain_matching=strategy.get("enableChainMatching", True) is not False,
            require_chain=strategy.get("requireChain", False) is True,
            enable_tenant_hot=strategy.get("enableTenantHot", True) is not False,
        ),
    )


def policy_payload(policies: Sequence[Mapping[str, Any]], tenants: Sequence[Mapping[str, Any]]) -> Obj:
    """The full ``/policy`` v7 body for every CachePolicy and quota-bearing CacheTenant.

    Policies sorted by (namespace, name), the first per namespace wins (admission allows
    one per namespace). Tenants: non-empty ``tenantID`` with ``quota.maxIndexEntries`` set,
    sorted by (namespace, name), the first per tenant id wins.
    """
    by_namespace: dict[str, index_policy.NamespacePolicy] = {}
    for cr in sorted(policies, key=_key):
        by_namespace.setdefault(_key(cr)[0], _namespace_policy(cr))
    quotas: dict[str, index_policy.TenantQuota] = {}
    for cr in sorted(tenants, key=_key):
        spec = cr.get("spec") or {}
        tenant_id = spec.get("tenantID") or ""
        budget = (spec.get("quota") or {}).get("maxIndexEntries")
        if tenant_id and budget is not None and tenant_id not in quotas:
            quotas[tenant_id] = index_policy.TenantQuota(
                tenant_id, int(budget), spec.get("isolationMode") or policy_wire.DEFAULT_ISOLATION_MODE
            )
    payload: Obj = json.loads(policy_wire.encode(by_namespace.values(), quotas.values()))
    return payload


@dataclass(frozen=True, slots=True)
class PushRecord:
    """The last successful push: its body and when (the handler's clock, seconds)."""

    payload: Obj
    at: float


def push_due(
    payload: Mapping[str, Any], last: PushRecord | None, now: float, interval_s: float = PUSH_INTERVAL_S
) -> bool:
    """Push when nothing was pushed yet, the payload changed, or ``interval_s`` elapsed
    (the server may have restarted and lost it). Record only successful pushes."""
    return last is None or last.payload != payload or now - last.at >= interval_s


# -- /snapshot ----------------------------------------------------------------------------


def rate(value: float) -> str:
    """A float32 rate as Go ``strconv.FormatFloat(float64(f32), 'f', -1, 32)`` (no exponent)."""
    text = snapshot_wire.go_float32(value)
    return format(Decimal(text), "f") if "e" in text else text


def _pod_ips(pod: Mapping[str, Any]) -> set[str]:
    st = pod.get("status") or {}
    ips = {entry.get("ip", "") for entry in st.get("podIPs") or []}
    ips.add(st.get("podIP", ""))
    ips.discard("")
    return ips


def _host(replica_id: str) -> str:
    host = replica_id.rpartition(":")[0] if ":" in replica_id else replica_id
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def attribute_pod(row: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The live pod a snapshot row belongs to: pod IP = the replica id's host (and, for a
    tenanted row, pod namespace = tenant). Finished pods never match (their IP is reused)."""
    host = _host(str(row.get("replicaId", "")))
    tenant = row.get("tenant") or ""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        if tenant and pod["metadata"].get("namespace") != tenant:
            continue
        if host in _pod_ips(pod):
            return pod
    return None


def _rows(snapshot: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return list(snapshot.get(key) or [])  # Go encodes an empty list as null


def _comparable(status: Mapping[str, Any]) -> Obj:
    out = {k: v for k, v in status.items() if k != "lastUpdated"}
    out["replicas"] = [
        {k: v for k, v in r.items() if k != "lastUpdate"} for r in status.get("replicas") or []
    ]
    return out


def cacheindex_status(
    snapshot_json: Mapping[str, Any],
    now: dt.datetime,
    *,
    server_url: str = "",
    previous: Mapping[str, Any] | None = None,
) -> Obj:
    """``CacheIndex/cluster-default`` status from one ``/snapshot`` body (seed §1.6).

    Only replicas with stats are listed (a duplicate id across tenants keeps the
    lexicographically greatest tenant). Returns ``previous`` unchanged when nothing but
    ``lastUpdated`` and the per-replica ``lastUpdate`` would change (the handler then skips
    the write).
    """
    replicas: dict[str, Obj] = {}
    for row in _rows(snapshot_json, "replicas"):
        if parse_time(row.get("lastUpdate")) is None:
            continue
        rid = str(row["replicaId"])
        tenant = row.get("tenant") or ""
        if rid in replicas and replicas[rid].get("tenant", "") >= tenant:
            continue
        entry: Obj = {"id": rid}
        if tenant:
            entry["tenant"] = tenant
        entry.update(
            cacheMemoryBytes=int(row.get("cacheMemoryBytes", 0)),
            hitRate=rate(float(row.get("hitRate", 0))),
            pressure=rate(float(row.get("pressure", 0))),
            lastUpdate=row["lastUpdate"],
        )
        replicas[rid] = entry
    status: Obj = {
        "replicas": [replicas[k] for k in sorted(replicas)],
        "tenants": [
            {
                "id": t.get("tenantId", ""),
                "indexEntries": int(t.get("indexEntries", 0)),
                "memoryUsed": int(t.get("memoryUsed", 0)),
                "hitRate": rate(float(t.get("hitRate", 0))),
            }
            for t in _rows(snapshot_json, "tenants")
        ],
        "prefixes": {
            "summary": {
                "total": int(snapshot_json.get("totalPrefixes", 0)),
                "hot": int(snapshot_json.get("hotPrefixes", 0)),
            }
        },
        "observedServer": server_url,
        "lastUpdated": format_time(now),
    }
    if previous and _comparable(previous) == _comparable(status):
        return dict(previous)
    return status


def _backend_for(pod: Mapping[str, Any], backends: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    namespace = pod["metadata"].get("namespace", "")
    same_ns = sorted((b for b in backends if _key(b)[0] == namespace), key=_key)
    injected = ((pod["metadata"].get("annotations") or {}).get(INJECTED_BY_ANNOTATION) or "").partition("/")
    if injected[1] and injected[0] == namespace:
        return next((_key(b) for b in same_ns if _key(b)[1] == injected[2]), None)
    return next((_key(b) for b in same_ns if selects(match_labels(b), pod)), None)


def backend_participation(
    snapshot_json: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    backends: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], Obj]:
    """Status merge patches ``{"indexParticipation": {...}}`` per (namespace, name) of the
    CacheBackends whose participation changed.

    A row's pod (by IP) belongs to the backend its ``injected-by`` annotation names, else
    to the first backend (by name) in its namespace whose selector matches it.
    ``prefixCount`` is the sum, ``lastEventAt`` the newest non-zero time. Backends without
    a selector that never participated are left alone.
    """
    totals: dict[tuple[str, str], tuple[int, dt.datetime | None]] = {}
    for row in _rows(snapshot_json, "replicas"):
        pod = attribute_pod(row, pods)
        owner = _backend_for(pod, backends) if pod is not None else None
        if owner is None:
            continue
        count, last = totals.get(owner, (0, None))
        at = parse_time(row.get("lastEventAt"))
        newest = max((t for t in (last, at) if t is not None), default=None)
        totals[owner] = (count + int(row.get("prefixCount", 0)), newest)
    patches: dict[tuple[str, str], Obj] = {}
    for b in backends:
        current = (b.get("status") or {}).get("indexParticipation")
        if _key(b) not in totals and not match_labels(b) and current is None:
            continue
        count, last = totals.get(_key(b), (0, None))
        wanted: Obj = {"prefixCount": count}
        if last is not None:
            wanted["lastEventAt"] = format_time(last)
        have = {k: v for k, v in (current or {}).items() if k in ("prefixCount", "lastEventAt")}
        if have != wanted:
            patches[_key(b)] = {
                "indexParticipation": {"prefixCount": count, "lastEventAt": wanted.get("lastEventAt")}
            }
    return patches


def tenant_statuses(
    snapshot_json: Mapping[str, Any],
    tenants: Sequence[Mapping[str, Any]],
    now: dt.datetime,
) -> dict[tuple[str, str], Obj]:
    """The desired ``status`` of every CacheTenant (seed §6.6 step 3).

    The effective owner of a tenant id is the first quota-bearing CR by (namespace, name)
    (the one ``policy_payload`` sends); other CRs with that id are shadowed duplicates.
    """
    entries = {t.get("tenantId", ""): int(t.get("indexEntries", 0)) for t in _rows(snapshot_json, "tenants")}
    owners: dict[str, tuple[str, str]] = {}
    for cr in sorted(tenants, key=_key):
        spec = cr.get("spec") or {}
        if (spec.get("quota") or {}).get("maxIndexEntries") is not None:
            owners.setdefault(spec.get("tenantID") or "", _key(cr))
    out: dict[tuple[str, str], Obj] = {}
    for cr in tenants:
        spec = cr.get("spec") or {}
        tenant_id = spec.get("tenantID") or ""
        count = entries.get(tenant_id, 0)
        budget = (spec.get("quota") or {}).get("maxIndexEntries")
        previous = (cr.get("status") or {}).get("conditions") or []
        generation = int(cr["metadata"].get("generation", 0))
        owner = owners.get(tenant_id)
        if owner is not None and owner != _key(cr):
            ready = (
                False,
                "DuplicateTenantID",
                f"tenantID {tenant_id!r} is owned by CacheTenant {owner[0]}/{owner[1]}",
            )
            quota = (False, "NotEffective", "this CacheTenant's quota is shadowed by the effective owner")
        else:
            ready = (True, "Observed", "projected from the latest server snapshot read")
            if budget is None:
                quota = (False, "NoQuota", "no quota.maxIndexEntries set")
            elif count > int(budget):
                quota = (True, "OverEntryBudget", f"index entries {count} exceed budget {budget}")
            else:
                quota = (False, "WithinBudget", f"index entries {count} within budget {budget}")
        out[_key(cr)] = {
            "observedGeneration": generation,
            "indexEntries": count,
            "conditions": [
                make_condition(previous, "Ready", *ready, now=now, generation=generation),
                make_condition(previous, "QuotaExceeded", *quota, now=now, generation=generation),
            ],
        }
    return out
