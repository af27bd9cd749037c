"""The original Go project's external contracts, pinned in one place (seed inventory).

Everything here is copied from ``/work/shared/research/seed-inventory.md`` (the original at
``ed02025``, plus what its HEAD added), so a rename, a renumbered field or a changed default
fails CI even when the behaviour tests still pass:

* §2.2 + §7.2(b): every message, field name, field number and type, the ``CacheEvent.Type``
  values and the ``InferenceCache`` RPCs, read from the compiled descriptors. Our own
  additions are allowed; the field numbers the original's HEAD uses for fields we do not
  have must stay free (never reused with another meaning).
* §3.7: the Prometheus series (name, type, label names, buckets) as ``/metrics`` prints them.
* Appendix A / §3.1 / §5.5: the flag defaults and constants other components rely on.

Documented divergences are pinned as ours, with the document that explains them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2
from prometheus_client import generate_latest

from inference_cache import config, subscribe
from inference_cache.extproc import auth, metrics, policy_wire
from inference_cache.extproc import http as ic_http
from inference_cache.index import policy, store
from inference_cache.operator import backend, controlplane, server_client, webhook
from inference_cache.proto import pb

PACKAGE = "inferencecache.v1alpha1"

# §2.2 field for field (ed02025; the comments dropped, the lines rewrapped).
SEED_MESSAGES = """
RenderTemplateRequest  { string template_ref=1; map<string,string> variables=2; string tenant_id=3; }
RenderTemplateResponse { bytes rendered_prompt=1; bytes stable_prefix_hash=2;
                        bytes tenant_namespace=3; string reason_code=4; string template_revision=5; }
SLO                    { int32 ttft_ms=1; int32 tbt_ms=2; }
LookupRouteRequest     { string model_id=1; string tenant_id=2; bytes prefix_hash=3;
                        int32 prefix_token_count=4; string hash_scheme=5; SLO slo=6;
                        repeated bytes block_hashes=7; repeated int32 block_token_counts=8; }
ReplicaScore           { string replica_id=1; float score=2; int32 matched_tokens=3;
                        float estimated_cache_hit_prob=4; }
LookupRouteResponse    { repeated ReplicaScore replica_scores=1; string reason_code=2;
                        int64 lookup_latency_us=3; }
LookupPDRouteRequest   { string model_id=1; string tenant_id=2; bytes prefix_hash=3;
                        int32 prefix_token_count=4; string pd_topology_ref=5; }
LookupPDRouteResponse  { string prefill_replica_id=1; string decode_replica_id=2;
                        string transport_hint=3; string reason_code=4; }
PrefixEntry            { bytes prefix_hash=1; int32 token_count=2; repeated bytes block_hashes=3;
                        repeated int32 block_token_counts=4; }
ReplicaStats           { string replica_id=1; int64 cache_memory_bytes=2; float hit_rate=3;
                        float pressure=4; }
CacheStateUpdate       { string replica_id=1; string model_id=2; string tenant_id=3;
                        string hash_scheme=4; int64 timestamp_us=5; repeated PrefixEntry prefixes=6;
                        ReplicaStats stats=7; }
CacheSummary           { int64 total_prefixes=1; int64 hot_prefixes=2; }
GetCacheStateRequest   { string model_id=1; string tenant_id=2; }
GetCacheStateResponse  { repeated ReplicaStats replicas=1; CacheSummary summary=2; }
CacheEvent             { CacheEvent.Type type=1; string replica_id=2; string model_id=3;
                        string tenant_id=4; bytes prefix_hash=5; int64 timestamp_us=6; }
StreamEventsRequest    { string model_id=1; string tenant_id=2; repeated CacheEvent.Type types=3; }
StreamMetricsRequest   { repeated string names=1; }
Metric                 { string name=1; string type=2; map<string,string> labels=3; double value=4;
                        int64 timestamp_us=5; }
Ack                    { bool accepted=1; string reason_code=2; }
"""

# §7.2(b): the dual-input fields; adapter_id (§9.2 #7) with the numbers of the original's
# HEAD proto (proto/inferencecache/v1alpha1/inferencecache.proto there).
HEAD_MESSAGES = """
LookupRouteRequest  { repeated uint32 token_ids=9; string prompt_text=10; string adapter_id=11; }
LookupRouteResponse { repeated uint32 token_ids=4; string adapter_id=5; }
PrefixEntry         { string adapter_id=6; }
CacheStateUpdate    { string adapter_id=8; }
CacheEvent          { string adapter_id=7; }
"""

# Numbers the original's HEAD gave fields we do not carry: they must stay unused here.
HEAD_NUMBERS_WE_LEAVE_FREE = {
    "ReplicaScore": {5},  # CacheTier tier
    "PrefixEntry": {5},  # CacheTier tier
    "ReplicaStats": {5, 6, 7},  # client_version, t2_hit_tokens, t2_query_tokens
}

CACHE_EVENT_TYPES = {
    "TYPE_UNSPECIFIED": 0,
    "PREFIX_ADDED": 1,
    "PREFIX_EVICTED": 2,
    "REPLICA_UPDATED": 3,
    "ALL_CLEARED": 4,
}

# §2.1: name -> (request, response, client streaming, server streaming).
SEED_RPCS = {
    "RenderTemplate": ("RenderTemplateRequest", "RenderTemplateResponse", False, False),
    "LookupRoute": ("LookupRouteRequest", "LookupRouteResponse", False, False),
    "LookupPDRoute": ("LookupPDRouteRequest", "LookupPDRouteResponse", False, False),
    "GetCacheState": ("GetCacheStateRequest", "GetCacheStateResponse", False, False),
    "ReportCacheState": ("CacheStateUpdate", "Ack", True, False),
    "PublishEvent": ("CacheEvent", "Ack", False, False),
    "StreamCacheEvents": ("StreamEventsRequest", "CacheEvent", False, True),
    "StreamMetrics": ("StreamMetricsRequest", "Metric", False, True),
}

_FIELD = re.compile(r"(repeated\s+)?(map<\w+,\w+>|[\w.]+)\s+(\w+)=(\d+);")
_MESSAGE = re.compile(r"(\w+)\s*\{([^}]*)\}")

Fields = dict[str, dict[str, tuple[int, str]]]


def _parse(spec: str) -> Fields:
    """``Msg { type name=N; ... }`` -> {message: {field: (number, type)}}."""
    out: Fields = {}
    for name, body in _MESSAGE.findall(spec):
        out[name] = {
            f: (int(n), ("repeated " if rep else "") + typ) for rep, typ, f, n in _FIELD.findall(body)
        }
    return out


def _file() -> descriptor_pb2.FileDescriptorProto:
    fp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fp)
    return fp


_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def _type_name(field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, str]) -> str:
    if field.type_name:
        local = field.type_name.removeprefix(f".{PACKAGE}.")
        if local in maps:
            return maps[local]
        base = local
    else:
        base = _SCALARS[field.type]
    repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    return f"repeated {base}" if repeated else base


def _ours() -> tuple[Fields, dict[str, set[int]]]:
    """Our compiled messages as {message: {field: (number, type)}}, and their reserved numbers."""
    fields: Fields = {}
    reserved: dict[str, set[int]] = {}
    for msg in _file().message_type:
        maps = {
            f"{msg.name}.{n.name}": f"map<{_SCALARS[n.field[0].type]},{_SCALARS[n.field[1].type]}>"
            for n in msg.nested_type
            if n.options.map_entry
        }
        fields[msg.name] = {f.name: (f.number, _type_name(f, maps)) for f in msg.field}
        reserved[msg.name] = {n for r in msg.reserved_range for n in range(r.start, r.end)}
    return fields, reserved


def _pinned() -> Iterator[tuple[str, str, int, str]]:
    for spec in (SEED_MESSAGES, HEAD_MESSAGES):
        for message, fields in _parse(spec).items():
            for name, (number, typ) in fields.items():
                yield message, name, number, typ


def test_the_specs_parse() -> None:
    """The spec text above is read completely (a typo would silently pin less)."""
    for spec in (SEED_MESSAGES, HEAD_MESSAGES):
        parsed = _parse(spec)
        assert len(parsed) == spec.count("{")
        assert sum(len(f) for f in parsed.values()) == spec.count("=")
    seed = _parse(SEED_MESSAGES)
    assert len(seed) == 19
    assert seed["RenderTemplateRequest"]["variables"] == (2, "map<string,string>")
    assert seed["LookupRouteRequest"]["block_hashes"] == (7, "repeated bytes")


@pytest.mark.parametrize(("message", "field", "number", "typ"), list(_pinned()))
def test_proto_field(message: str, field: str, number: int, typ: str) -> None:
    fields, _ = _ours()
    assert fields[message][field] == (number, typ)


def test_proto_package_and_go_package() -> None:
    fp = _file()
    assert fp.package == PACKAGE
    assert fp.options.go_package == (
        "github.com/cachebox-project/inference-cache/pkg/server/proto/inferencecache/v1alpha1;"
        "inferencecachev1alpha1pb"
    )


def test_cache_event_type_values() -> None:
    enum = pb.DESCRIPTOR.message_types_by_name["CacheEvent"].enum_types_by_name["Type"]
    assert {v.name: v.number for v in enum.values} == CACHE_EVENT_TYPES


def test_service_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["InferenceCache"]
    assert service.full_name == f"{PACKAGE}.InferenceCache"
    got = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert got == SEED_RPCS


def test_head_numbers_stay_free() -> None:
    fields, reserved = _ours()
    for message, numbers in HEAD_NUMBERS_WE_LEAVE_FREE.items():
        used = {n for n, _ in fields[message].values()}
        assert not numbers & used, message
        assert numbers <= reserved[message], message


# -- §3.7 metrics ---------------------------------------------------------------------

# name as /metrics prints it -> (type, label names); buckets below.
SEED_METRICS = {
    "inferencecache_server_up": ("gauge", ()),
    "inferencecache_server_grpc_tls_enabled": ("gauge", ()),
    "inferencecache_index_entries": ("gauge", ("model",)),
    "inferencecache_lookup_route_calls_total": ("counter", ("hint_used", "model", "reason_code")),
    "inferencecache_lookup_route_latency_seconds": ("histogram", ("model",)),
    "inferencecache_tenant_evictions_total": ("counter", ("reason", "tenant_id")),
    "inferencecache_index_evictions_total": ("counter", ("algorithm", "reason")),
    "inferencecache_snapshot_auth_total": ("counter", ("result",)),
    "inferencecache_policy_auth_total": ("counter", ("result",)),
}
SEED_LATENCY_BUCKETS = (
    "0.0001",
    "0.00025",
    "0.0005",
    "0.001",
    "0.0025",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "+Inf",
)

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? ")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _exposition() -> str:
    """A registry with one series of every contract family, as ``/metrics`` prints it."""
    m = metrics.ServerMetrics(
        read_index=lambda: metrics.IndexReadings(
            entries_by_model={"m": 1},
            tenant_evictions={("t", "over_entries"): 1},
            index_evictions={("lru", "cap"): 1},
        )
    )
    m.observe_lookup("m", "NO_HINT", False, 0.0003)
    m.snapshot_auth.labels(auth.AuthResult.OK).inc()
    m.policy_auth.labels(auth.AuthResult.UNAUTH).inc()
    return generate_latest(m.registry).decode()


def _families(text: str) -> dict[str, tuple[str, set[tuple[str, ...]], list[str]]]:
    """{TYPE name: (type, label-name tuples of its samples, ``le`` values in order)}."""
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))
    out: dict[str, tuple[str, set[tuple[str, ...]], list[str]]] = {
        n: (t, set(), []) for n, t in types.items()
    }
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, raw = match.groups()
        family = next(
            (
                f
                for f in (
                    name,
                    name.removesuffix("_bucket"),
                    name.removesuffix("_sum"),
                    name.removesuffix("_count"),
                )
                if f in out
            ),
            None,
        )
        if family is None:
            continue
        labels = dict(_LABEL.findall(raw or ""))
        if "le" in labels:
            out[family][2].append(labels.pop("le"))
        out[family][1].add(tuple(sorted(labels)))
    return out


@pytest.mark.parametrize("name", sorted(SEED_METRICS))
def test_contract_metric(name: str) -> None:
    typ, labels = SEED_METRICS[name]
    got_type, got_labels, _ = _families(_exposition())[name]
    assert (got_type, got_labels) == (typ, {labels})


def test_lookup_latency_buckets() -> None:
    _, _, buckets = _families(_exposition())["inferencecache_lookup_route_latency_seconds"]
    assert tuple(buckets) == SEED_LATENCY_BUCKETS


def test_auth_result_values() -> None:
    assert {r.value for r in auth.AuthResult} == {"ok", "unauth", "forbidden", "error"}


# -- defaults and constants (Appendix A, §3.1, §5.5) --------------------------------------


def test_server_flag_defaults() -> None:
    s = config.ServerSettings()
    assert (s.grpc_bind_address, s.http_bind_address, s.snapshot_bind_address) == (":9090", ":8080", ":8081")
    assert (s.log_format, s.log_level) == ("json", "info")
    assert (s.allowed_controller_sa, s.insecure_disable_auth) == ("", False)
    assert s.controller_audience == auth.CONTROLLER_AUDIENCE == "inferencecache.io/controller"
    assert (s.tls_cert_file, s.tls_key_file) == ("", "")


def test_index_and_ranker_defaults() -> None:
    s = store.IndexSettings()
    assert policy.DEFAULT_TTL_S == 30 * 60
    assert (s.sweep_interval_s, s.max_entries) == (60, 1_000_000)
    assert (s.pressure_weight, s.slo_tight_ttft_ms, s.slo_tight_bias) == (1.0, 200, 1.0)
    assert (s.tenant_hot_min_hit_rate, s.tenant_hot_max_age_s) == (0.1, 300)
    assert store.PROBE_TENANT == "inferencecache.io/probe"


def test_policy_and_auth_constants() -> None:
    # v3 is the original's schema; 4-7 its HEAD's (extproc/policy_wire.py docstring).
    assert (policy_wire.POLICY_MINIMUM_ACCEPTED_VERSION, policy_wire.POLICY_PROPAGATION_VERSION) == (3, 7)
    assert ic_http.MAX_POLICY_BODY_BYTES == 1 << 20
    assert (auth.DEFAULT_CACHE_TTL_S, auth.DEFAULT_CACHE_MAX_ENTRIES) == (30, 32)


def test_operator_names() -> None:
    assert backend.GROUP == "inferencecache.io"
    assert controlplane.CACHE_INDEX_NAME == "cluster-default"
    assert controlplane.PUSH_INTERVAL_S == 30
    assert server_client.DEFAULT_TOKEN_FILE == "/var/run/secrets/inferencecache.io/controller-token/token"
    assert (backend.SKIP_INJECT_ANNOTATION, backend.REQUIRE_KV_EVENTS_ANNOTATION) == (
        "inferencecache.io/skip-inject",
        "inferencecache.io/require-kv-events",
    )
    assert (webhook.ANNOTATION_INJECTED_BY, webhook.ANNOTATION_INJECTED_BY_UID) == (
        "inferencecache.io/injected-by",
        "inferencecache.io/injected-by-uid",
    )


def test_subscriber_flag_defaults() -> None:
    parser = argparse.ArgumentParser()
    subscribe.add_arguments(parser)
    a = parser.parse_args(["--replica-id", "r", "--model-id", "m"])
    assert a.engine_endpoint == "tcp://127.0.0.1:5557"
    assert a.server == "127.0.0.1:9090"
    assert (a.tenant_id, a.hash_scheme) == ("", "vllm")
    assert (a.window, a.stats_interval) == (0.1, 10.0)
    assert a.engine_metrics_url == "http://127.0.0.1:8000/metrics"
    assert (a.engine_cache_size_bytes, a.max_concurrency_ceiling) == (0, 256)
    assert (a.cache_tier, a.engine_model_name) == ("auto", "")
    # Divergence (docs/configuration.md, "Differences from the original kvevent-subscriber"):
    # the original subscribed to topic "kv-events"; ours takes every topic by default.
    assert a.topic == ""
    for required in ("--replica-id", "--model-id"):
        args = ["--replica-id", "r", "--model-id", "m"]
        i = args.index(required)
        with pytest.raises(SystemExit):
            parser.parse_args(args[:i] + args[i + 2 :])
