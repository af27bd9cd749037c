"""The server's Prometheus registry: the original's series, plus ingest and index size.

Owner: ``inference_cache.extproc`` (the server). One :class:`ServerMetrics` per server
(never the global default registry, so two servers in one process do not collide). Place
in the flow: the gRPC API observes LookupRoute calls here, the HTTP auth middlewares count
results here, and ``/metrics`` / ``StreamMetrics`` read :attr:`ServerMetrics.registry`.

Numbers owned by the index (entries, evictions, sizes) and by the KV-event ingest (events,
decode errors, gaps, ...) are not pushed: :class:`StateCollector` reads them at scrape time
through two callables the composition root supplies, so the hot paths never touch metrics.

Contract series (names, labels and buckets exactly as the original, see
the original's ``docs/reference/metrics.md``; ours: ``docs/metrics.md``): ``inferencecache_server_up``,
``inferencecache_server_grpc_tls_enabled``, ``inferencecache_index_entries{model}``,
``inferencecache_lookup_route_calls_total{model,reason_code,hint_used}``,
``inferencecache_lookup_route_latency_seconds{model}``,
``inferencecache_tenant_evictions_total{tenant_id,reason}``,
``inferencecache_index_evictions_total{algorithm,reason}``,
``inferencecache_snapshot_auth_total{result}``, ``inferencecache_policy_auth_total{result}``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inference_cache.extproc.picking import Decision, Rejection, Usage
from inference_cache.index.kvevents.counters import EVENT_TYPES

LOOKUP_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


@dataclass(frozen=True, slots=True)
class IndexReadings:
    """What the index reports at scrape time."""

    #: Distinct prefix keys per model (all tenants and schemes).
    entries_by_model: Mapping[str, int] = field(default_factory=dict)
    #: Replica x key entries.
    entries: int = 0
    #: Distinct keys.
    distinct_keys: int = 0
    #: ``(tenant, model, replica)`` stats entries (replicas with reported load/cache stats).
    replica_stats: int = 0
    #: (tenant_id, reason) -> distinct prefixes evicted by tenant quota.
    tenant_evictions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: (algorithm, reason) -> replica x prefix entries removed by sweeps/cap.
    index_evictions: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IngestReadings:
    """KV-event ingest counters, summed over every endpoint's subscriber (and the batches
    per endpoint)."""

    #: Event type (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``) -> count.
    events: Mapping[str, int] = field(default_factory=dict)
    decode_errors: int = 0
    gaps: int = 0
    replays: int = 0
    resyncs: int = 0
    orphan_blocks: int = 0
    #: Reason -> blocks skipped (not ingested).
    skipped_blocks: Mapping[str, int] = field(default_factory=dict)
    #: Endpoint address -> KV-event batches applied from it (live and replayed), one entry
    #: per endpoint whose events the server subscribes to (``endpoints[].kv_events``).
    batches_by_endpoint: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelMatching:
    """How one model is matched, read at scrape time (``picker.Route`` and its byte index)."""

    model: str
    #: ``models[].matching`` as configured (``auto``, ``tokens``, ``bytes``, ``approximate``).
    requested: str
    #: What runs now: ``tokens``, ``bytes`` or ``approximate``.
    mode: str
    #: Replica x block entries of the model's byte chain (0 without one).
    byte_entries: int = 0
    #: Estimated memory of the byte chain beyond the index.
    byte_bytes: int = 0
    #: ``ByteMatch.boundary`` outcome -> byte-matched requests.
    boundaries: Mapping[str, int] = field(default_factory=dict)
    #: Reason -> requests of the model that took the token path although it matches by bytes.
    fallbacks: Mapping[str, int] = field(default_factory=dict)


class MatchingCollector(Collector):
    """Per model: its matching mode, and the byte path's index size and outcomes (issue #9)."""

    def __init__(self, read: Callable[[], Iterable[ModelMatching]]) -> None:
        self._read = read

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """Nothing to check at registration (the picker ``read`` needs is built later)."""
        return ()

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        models = list(self._read())
        mode = GaugeMetricFamily(
            "inferencecache_matching_mode",
            "1 for the matching each model runs (mode), as configured (requested).",
            labels=["model", "requested", "mode"],
        )
        entries = GaugeMetricFamily(
            "inferencecache_byte_index_entries",
            "Replica x block entries of the model's byte chain (auxiliary: not index entries).",
            labels=["model"],
        )
        size = GaugeMetricFamily(
            "inferencecache_byte_index_bytes",
            "Estimated memory of the model's byte chain beyond the index.",
            labels=["model"],
        )
        per_entry = GaugeMetricFamily(
            "inferencecache_byte_index_bytes_per_entry",
            "inferencecache_byte_index_bytes / inferencecache_byte_index_entries (0 when empty).",
            labels=["model"],
        )
        boundaries = CounterMetricFamily(
            "inferencecache_byte_match_boundaries",
            "Byte-matched requests by boundary-check outcome.",
            labels=["model", "outcome"],
        )
        fallbacks = CounterMetricFamily(
            "inferencecache_byte_match_fallbacks",
            "Requests of a model matched by bytes that took the token path, by reason.",
            labels=["model", "reason"],
        )
        for m in models:
            mode.add_metric([m.model, m.requested, m.mode], 1)
            if m.mode != "bytes" and not m.byte_entries:
                continue
            entries.add_metric([m.model], m.byte_entries)
            size.add_metric([m.model], m.byte_bytes)
            per_entry.add_metric([m.model], m.byte_bytes / m.byte_entries if m.byte_entries else 0)
            for outcome, n in sorted(m.boundaries.items()):
                boundaries.add_metric([m.model, outcome], n)
            for reason, n in sorted(m.fallbacks.items()):
                fallbacks.add_metric([m.model, reason], n)
        yield from (mode, entries, size, per_entry, boundaries, fallbacks)


class StateCollector(Collector):
    """Reads index and ingest counters at scrape time.

    ``inferencecache_index_entries{model}`` keeps reporting 0 for a model that drained
    (as the original: set to 0, not deleted).
    """

    def __init__(
        self, read_index: Callable[[], IndexReadings], read_ingest: Callable[[], IngestReadings]
    ) -> None:
        self._read_index = read_index
        self._read_ingest = read_ingest
        self._models_seen: set[str] = set()

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        idx = self._read_index()
        self._models_seen.update(idx.entries_by_model)
        entries = GaugeMetricFamily(
            "inferencecache_index_entries", "Distinct prefix keys per model.", labels=["model"]
        )
        for model in sorted(self._models_seen):
            entries.add_metric([model], idx.entries_by_model.get(model, 0))
        yield entries
        yield GaugeMetricFamily(
            "inferencecache_index_size_entries", "Replica x key entries in the index.", idx.entries
        )
        yield GaugeMetricFamily(
            "inferencecache_index_distinct_keys", "Distinct block keys in the index.", idx.distinct_keys
        )
        yield GaugeMetricFamily(
            "inferencecache_index_replica_stats",
            "(tenant, model, replica) stats entries in the index.",
            idx.replica_stats,
        )
        tenant = CounterMetricFamily(
            "inferencecache_tenant_evictions",
            "Distinct prefixes evicted by tenant quota.",
            labels=["tenant_id", "reason"],
        )
        for (tenant_id, reason), n in sorted(idx.tenant_evictions.items()):
            tenant.add_metric([tenant_id, reason], n)
        yield tenant
        evictions = CounterMetricFamily(
            "inferencecache_index_evictions",
            "Replica x prefix entries removed by the TTL sweep (reason ttl) or the entry cap (reason cap).",
            labels=["algorithm", "reason"],
        )
        for (algorithm, reason), n in sorted(idx.index_evictions.items()):
            evictions.add_metric([algorithm, reason], n)
        yield evictions

        ing = self._read_ingest()
        events = CounterMetricFamily(
            "inferencecache_kv_events", "KV events ingested, by event type.", labels=["type"]
        )
        # every type from the start (0 until its first event), so that "no event since the
        # server started" is a series an alert can test
        for type_ in sorted({*EVENT_TYPES, *ing.events}):
            events.add_metric([type_], ing.events.get(type_, 0))
        yield events
        for name, help_, value in (
            (
                "inferencecache_kv_event_decode_errors",
                "KV-event batches that failed to decode.",
                ing.decode_errors,
            ),
            ("inferencecache_kv_event_gaps", "Sequence gaps seen on KV-event streams.", ing.gaps),
            ("inferencecache_kv_event_replays", "Replay requests sent to engines.", ing.replays),
            ("inferencecache_kv_event_resyncs", "Replica state dropped to resynchronise.", ing.resyncs),
            ("inferencecache_kv_orphan_blocks", "Stored blocks whose parent was unknown.", ing.orphan_blocks),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        skipped = CounterMetricFamily(
            "inferencecache_kv_skipped_blocks", "Blocks not ingested, by reason.", labels=["reason"]
        )
        for reason, n in sorted(ing.skipped_blocks.items()):
            skipped.add_metric([reason], n)
        yield skipped
        per_endpoint = CounterMetricFamily(
            "inferencecache_kv_endpoint_batches",
            "KV-event batches applied (live and replayed), per subscribed endpoint.",
            labels=["replica_id"],
        )
        for replica_id, n in sorted(ing.batches_by_endpoint.items()):
            per_endpoint.add_metric([replica_id], n)
        yield per_endpoint


class ServerMetrics:
    """The per-server registry and the collectors the server pushes to."""

    def __init__(
        self,
        *,
        read_index: Callable[[], IndexReadings] = IndexReadings,
        read_ingest: Callable[[], IngestReadings] = IngestReadings,
        read_matching: Callable[[], Iterable[ModelMatching]] = tuple,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.up = Gauge("inferencecache_server_up", "1 while the server is serving.", registry=r)
        self.grpc_tls_enabled = Gauge(
            "inferencecache_server_grpc_tls_enabled", "1 when gRPC serves TLS, else 0.", registry=r
        )
        self.lookup_calls = Counter(
            "inferencecache_lookup_route_calls",
            "LookupRoute calls by outcome.",
            ["model", "reason_code", "hint_used"],
            registry=r,
        )
        self.lookup_latency = Histogram(
            "inferencecache_lookup_route_latency_seconds",
            "LookupRoute handler latency.",
            ["model"],
            buckets=LOOKUP_LATENCY_BUCKETS,
            registry=r,
        )
        self.snapshot_auth = Counter(
            "inferencecache_snapshot_auth", "/snapshot auth results.", ["result"], registry=r
        )
        self.policy_auth = Counter(
            "inferencecache_policy_auth", "/policy auth results.", ["result"], registry=r
        )
        self.templates_auth = Counter(
            "inferencecache_templates_auth", "/templates auth results.", ["result"], registry=r
        )
        self.producer_auth = Counter(
            "inferencecache_producer_auth", "Write-RPC auth results.", ["result"], registry=r
        )
        self.stream_events_dropped = Counter(
            "inferencecache_stream_events_dropped",
            "Cache events dropped because a StreamCacheEvents consumer was too slow.",
            registry=r,
        )
        self.endpoint_ready = Gauge(
            "inferencecache_endpoint_ready",
            "1 while the configured engine endpoint answers its health probe.",
            ["replica_id"],
            registry=r,
        )
        self.extproc = ExtProcMetrics(r)
        self.gc_pauses = GcPauses(r)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(StateCollector(read_index, read_ingest))
        r.register(MatchingCollector(read_matching))

    def observe_lookup(self, model: str, reason_code: str, hint_used: bool, seconds: float) -> None:
        self.lookup_calls.labels(model, reason_code, "true" if hint_used else "false").inc()
        self.lookup_latency.labels(model).observe(seconds)


GC_PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class GcPauses:
    """``inferencecache_gc_pause_seconds{generation}``: how long each cyclic-GC collection
    held the interpreter (every request on the event loop waits it out). The long-lived
    structures (index, byte chain, speculative entries) hold only ints and bytes so that
    full collections stay short; this shows whether they do. ``start``/``stop`` add and
    remove the ``gc.callbacks`` hook (process-wide, so the server owns its lifetime)."""

    def __init__(self, r: CollectorRegistry, clock: Callable[[], float] = time.perf_counter) -> None:
        self.histogram = Histogram(
            "inferencecache_gc_pause_seconds",
            "Wall time of each cyclic-GC collection, by generation.",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=r,
        )
        self._by_generation = [self.histogram.labels(str(g)) for g in range(3)]
        self._clock = clock
        self._started = 0.0

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            self._by_generation[info["generation"]].observe(self._clock() - self._started)


DECISION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class ExtProcMetrics:
    """The endpoint picker's series: ``protocol.ProtocolObserver`` and the picker's
    observer in one (``docs/metrics.md``)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "inferencecache_extproc_requests",
            "ext_proc streams by body mode and outcome (routed, an error kind, abandoned).",
            ["mode", "outcome"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "inferencecache_extproc_decision_seconds",
            "Time from a complete request to its routing decision (parse, tokenize, match, score).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "inferencecache_extproc_decisions",
            "Routing decisions by model and how the prefix was matched "
            "(precise, approximate, timeout = load only, none = no prompt).",
            ["model", "match"],
            registry=r,
        )
        self.tokens = Counter(
            "inferencecache_extproc_tokens",
            "Prompt and cached tokens of routed requests: predicted by us vs reported by the engine "
            "(response usage; only requests with both).",
            ["kind", "source"],
            registry=r,
        )
        self.routed = Counter(
            "inferencecache_extproc_routed",
            "Routing decisions by the endpoint chosen first (the destination header's first entry).",
            ["replica_id"],
            registry=r,
        )
        self.prediction_mismatch = Counter(
            "inferencecache_extproc_prediction_mismatch",
            "Routed requests whose reported usage differs from our prediction, by field.",
            ["field"],
            registry=r,
        )

    def forget_endpoint(self, replica_id: str) -> None:
        """Drop an endpoint's per-endpoint series (discovery removed it): engine pods get a new
        address on every restart, and kept series would grow without bound."""
        self.routed.remove(replica_id)

    # -- protocol.ProtocolObserver ------------------------------------------------------------
    def request(self, *, mode: str, outcome: str, status: int) -> None:
        self.requests.labels(mode, outcome).inc()

    def usage(self, predicted: Decision, usage: Usage) -> None:
        pairs = (
            ("prompt", predicted.predicted_prompt_tokens, usage.prompt_tokens),
            ("cached", predicted.predicted_cached_tokens, usage.cached_tokens),
        )
        for kind, ours, theirs in pairs:
            if ours is None or theirs is None:
                continue
            self.tokens.labels(kind, "predicted").inc(ours)
            self.tokens.labels(kind, "reported").inc(theirs)
            if ours != theirs:
                self.prediction_mismatch.labels(kind).inc()

    # -- picker observer ----------------------------------------------------------------------
    def decided(self, decision: Decision | Rejection, seconds: float, model: str, match: str) -> None:
        self.decision_latency.observe(seconds)
        if isinstance(decision, Decision):
            self.decisions.labels(model, match).inc()
            if decision.endpoints:
                self.routed.labels(decision.endpoints[0]).inc()
