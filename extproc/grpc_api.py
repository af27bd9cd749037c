"""The ``InferenceCache`` gRPC service (grpc.aio): wire <-> domain, field by field.

Owner: ``inference_cache.extproc`` (the server). Place in the flow::

    gateway  --LookupRoute-->        InferenceCacheService --lookup--> index.store.Index
    producer --ReportCacheState-->   (update_from_wire)    --ingest-->
    producer --PublishEvent-->       (event_from_wire)     --apply_event-->
    watcher  <--StreamCacheEvents--  bounded queue per stream <--listener-- Index
    watcher  <--StreamMetrics--      ServerMetrics.registry

Contract (the original's; ours in ``docs/reason-codes.md``): no RPC answers a gRPC
error for business logic; lookups fail open (``NO_HINT``); ``reason_code`` is a string and
clients treat unknown codes as ``NO_HINT``. LookupRoute emits no logs.

LookupRoute inputs, first match wins (the original's later dual-input path):

1. ``prefix_hash`` / ``block_hashes`` / ``block_token_counts`` -> ``Index.lookup_route``
   with the tenant's policy (strategy gates, floors, AFFINITY_HINT: the index's side);
2. ``token_ids`` (at most ``MAX_LOOKUP_TOKENS``) -> our fingerprint chain
   (``fingerprint.chain_keys(token_ids, model.block_size)``) looked up by
   ``Index.lookup_tokens`` in the scope of the model's configured endpoints: tenant from the
   config (the request's ``tenant_id`` is not used), ``hash_scheme`` ``vllm`` (empty means
   ``vllm``; another scheme is ``NO_HINT``), adapter ``adapter_id``. An unconfigured model,
   fewer tokens than one block, or fewer than the policy's ``minimumPrefixTokens`` is
   ``NO_HINT``; a policy with ``requireChain`` answers ``POLICY_REQUIRES_CHAIN`` (no wire
   chain was sent). The token ids are not echoed;
3. ``prompt_text`` -> ``NO_HINT`` for now: server-side tokenization lands with a later issue.

Deadlines: the tenant policy's ``lookupTimeoutMs`` and the caller's gRPC deadline bound the
call. The index lookup is CPU-bound and runs inline on the loop (it cannot be interrupted
half-way), so the deadline is checked before it and after it: an answer that arrives late
is ``TIMEOUT``, with no LFU credit. Only delivered answers credit hits. A hash-keyed
``NO_HINT`` carries no scores (as the original); a token-keyed answer lists every replica
with a matched block whatever its reason: the floors (``minimumMatchedTokens``,
``routingFloorScore``) only choose ``PREFIX_MATCH`` vs ``NO_HINT``, and the
distinguishing-power factor counts the model's configured endpoints as candidates.

StreamMetrics cadence: one snapshot of every (matching) sample immediately, then one every
``metrics_interval_s`` until the client cancels; all samples of one snapshot share one
``timestamp_us``. ``metrics_interval_s <= 0`` sends one snapshot and ends the stream.
``_created`` samples (a Python-client artefact) are never sent.

StreamCacheEvents: each stream owns a bounded queue fed by an index listener, and sends
its initial metadata as soon as it is subscribed (a client that awaits
``call.initial_metadata()`` misses no later event). When the consumer is slow, new events
are dropped and counted (``inferencecache_stream_events_dropped_total``): ingest never
waits for a watcher.

Producer separation: the write RPCs (ReportCacheState, PublishEvent) can be moved to their
own listener (``--producer-bind-address``); a servicer built with ``writes=False`` answers
them ``UNIMPLEMENTED`` ("served on the producer listener"), and one built with
``reads=False`` answers the read RPCs ``UNIMPLEMENTED``. A ``producer_auth`` callable, when
given, must accept the bearer token of ``authorization`` metadata before a write runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from inference_cache.config import Config, ModelConfig
from inference_cache.extproc import auth
from inference_cache.extproc.metrics import ServerMetrics
from inference_cache.index import fingerprint, store, types
from inference_cache.index import policy as policy_mod
from inference_cache.proto import pb, pb_grpc

#: The original's ``MaxLookupTokens``: longer ``token_ids`` lists get ``NO_HINT``.
MAX_LOOKUP_TOKENS = 1 << 20

NO_HINT = "NO_HINT"
TIMEOUT = "TIMEOUT"


#: Given the ``authorization`` metadata value (``None`` when absent), decide; the result
#: is counted in ``inferencecache_producer_auth_total``.
ProducerAuth = Callable[[str | None], Awaitable[auth.AuthResult]]

_AUTH_STATUS = {
    auth.AuthResult.UNAUTH: (grpc.StatusCode.UNAUTHENTICATED, "unauthorized"),
    auth.AuthResult.FORBIDDEN: (grpc.StatusCode.PERMISSION_DENIED, "forbidden"),
    auth.AuthResult.ERROR: (grpc.StatusCode.UNAVAILABLE, "token review unavailable"),
}

# -- wire <-> domain -------------------------------------------------------------------------


def _seconds(timestamp_us: int) -> float | None:
    """``timestamp_us == 0`` means "now" (the index clock)."""
    return timestamp_us / 1e6 if timestamp_us else None


def update_from_wire(msg: pb.CacheStateUpdate) -> types.Update:
    """``CacheStateUpdate`` -> ``Update``. The nested ``stats.replica_id`` is ignored: the
    top-level ``replica_id`` is authoritative."""
    stats = None
    if msg.HasField("stats"):
        stats = types.ReplicaStats(
            cache_memory_bytes=msg.stats.cache_memory_bytes,
            hit_rate=msg.stats.hit_rate,
            pressure=msg.stats.pressure,
        )
    return types.Update(
        replica_id=msg.replica_id,
        scope=types.Scope(msg.tenant_id, msg.model_id, msg.hash_scheme, msg.adapter_id),
        prefixes=[
            types.PrefixEntry(
                prefix_hash=p.prefix_hash,
                token_count=p.token_count,
                block_hashes=list(p.block_hashes),
                block_token_counts=list(p.block_token_counts),
                adapter=p.adapter_id,
            )
            for p in msg.prefixes
        ],
        stats=stats,
        timestamp=_seconds(msg.timestamp_us),
    )


def event_from_wire(msg: pb.CacheEvent) -> types.Event | None:
    """``CacheEvent`` -> ``Event``; ``TYPE_UNSPECIFIED`` and unknown types -> ``None``."""
    try:
        type_ = types.EventType(msg.type)
    except ValueError:
        return None
    if type_ is types.EventType.UNSPECIFIED:
        return None
    return types.Event(
        type=type_,
        replica_id=msg.replica_id,
        model=msg.model_id,
        tenant=msg.tenant_id,
        prefix_hash=msg.prefix_hash,
        adapter=msg.adapter_id,
        timestamp=_seconds(msg.timestamp_us),
    )


def event_to_wire(event: types.Event, now: float) -> pb.CacheEvent:
    ts = event.timestamp if event.timestamp is not None else now
    return pb.CacheEvent(
        type=int(event.type),  # type: ignore[arg-type]
        replica_id=event.replica_id,
        model_id=event.model,
        tenant_id=event.tenant,
        prefix_hash=event.prefix_hash,
        timestamp_us=int(ts * 1e6),
        adapter_id=event.adapter,
    )


def score_to_wire(s: types.ReplicaScore) -> pb.ReplicaScore:
    return pb.ReplicaScore(
        replica_id=s.replica_id,
        score=s.score,
        matched_tokens=s.matched_tokens,
        estimated_cache_hit_prob=s.estimated_cache_hit_prob,
    )


def _lookup_request(req: pb.LookupRouteRequest) -> types.LookupRequest:
    return types.LookupRequest(
        scope=types.Scope(req.tenant_id, req.model_id, req.hash_scheme, req.adapter_id),
        prefix_hash=req.prefix_hash,
        token_count=req.prefix_token_count,
        block_hashes=list(req.block_hashes),
        block_token_counts=list(req.block_token_counts),
        ttft_budget_ms=req.slo.ttft_ms,
        tbt_budget_ms=req.slo.tbt_ms,
    )


# -- the service ------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


class InferenceCacheService(pb_grpc.InferenceCacheServicer):
    def __init__(
        self,
        *,
        index: store.Index,
        policies: policy_mod.PolicyStore,
        config: Config,
        metrics: ServerMetrics,
        reads: bool = True,
        writes: bool = True,
        producer_auth: ProducerAuth | None = None,
        monotonic: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = time.time,
        stream_queue_size: int = 1024,
        metrics_interval_s: float = 10.0,
    ) -> None:
        self._index = index
        self._policies = policies
        self._config = config
        self._metrics = metrics
        self._reads = reads
        self._writes = writes
        self._producer_auth = producer_auth
        self._monotonic = monotonic
        self._clock = clock
        self._stream_queue_size = stream_queue_size
        self._metrics_interval_s = metrics_interval_s

    # -- gates ---------------------------------------------------------------------------------
    async def _read_gate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self._reads:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "read RPCs are not served on the producer listener"
            )

    async def _write_gate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self._writes:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "write RPCs are served on the producer listener (--producer-bind-address)",
            )
        if self._producer_auth is None:
            return
        result = await self._producer_auth(authorization(context.invocation_metadata()))
        self._metrics.producer_auth.labels(result.value).inc()
        if result is not auth.AuthResult.OK:
            code, message = _AUTH_STATUS[result]
            await context.abort(code, message)

    # -- unary reads -----------------------------------------------------------------------------
    async def RenderTemplate(
        self, request: pb.RenderTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RenderTemplateResponse:
        """Fail-open stub: ``OK`` with every other field empty (the caller hashes the raw
        prompt itself)."""
        await self._read_gate(context)
        return pb.RenderTemplateResponse(reason_code="OK")

    async def LookupPDRoute(
        self, request: pb.LookupPDRouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LookupPDRouteResponse:
        """Fail-open stub: ``NO_HINT``, no replica ids."""
        await self._read_gate(context)
        return pb.LookupPDRouteResponse(reason_code=NO_HINT)

    async def LookupRoute(
        self, request: pb.LookupRouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LookupRouteResponse:
        await self._read_gate(context)
        start = self._monotonic()
        reason, scores, measured = self._lookup(request, context.time_remaining(), start)
        elapsed = self._monotonic() - start if measured else 0.0
        self._metrics.observe_lookup(request.model_id, reason, bool(scores), elapsed)
        return pb.LookupRouteResponse(
            replica_scores=[score_to_wire(s) for s in scores],
            reason_code=reason,
            lookup_latency_us=int(elapsed * 1e6),
            adapter_id=request.adapter_id,
        )

    def _lookup(
        self, request: pb.LookupRouteRequest, remaining: float | None, start: float
    ) -> tuple[str, list[types.ReplicaScore], bool]:
        """-> (reason code, scores, whether the index was consulted)."""
        if request.tenant_id == store.PROBE_TENANT:  # the functional self-test
            return NO_HINT, [], False
        hash_keyed = bool(request.prefix_hash or request.block_hashes or request.block_token_counts)
        token_keyed = not hash_keyed and bool(request.token_ids)
        if not hash_keyed and not token_keyed and request.prompt_text:
            # No tokenizer yet: a later issue brings server-side tokenization.
            return NO_HINT, [], False
        model = self._config.model(request.model_id)
        tenant = self._config.tenant_of(model.name) if token_keyed and model else request.tenant_id
        policy = self._policies.policy(tenant)
        budget = policy.lookup_timeout_ms / 1000 if policy.lookup_timeout_ms > 0 else None
        deadline = min((b for b in (budget, remaining) if b is not None), default=None)
        if deadline is not None and deadline <= 0:
            return TIMEOUT, [], False
        if not token_keyed:
            result = self._index.lookup_route(_lookup_request(request), policy)
        else:
            if policy.strategy.require_chain:
                return types.Strategy.POLICY_REQUIRES_CHAIN.value, [], False
            keys = self._token_keys(request, model)
            if not keys or model is None:
                return NO_HINT, [], False
            min_tokens = policy.minimum_prefix_tokens
            if min_tokens > 0 and len(keys) * model.block_size < min_tokens:
                return NO_HINT, [], False
            scope = types.Scope(tenant, model.name, types.HASH_SCHEME_VLLM, request.adapter_id)
            candidates = sum(1 for e in self._config.endpoints if e.model == model.name)
            result = self._index.lookup_tokens(
                scope, keys, policy, ttft_budget_ms=request.slo.ttft_ms, replica_count=candidates
            )
            if deadline is not None and self._monotonic() - start > deadline:
                return TIMEOUT, [], True
            # Token-keyed: floors only chose the reason; every matched replica is listed.
            result.credit_hits()
            return result.strategy.value, list(result.scores), True
        if deadline is not None and self._monotonic() - start > deadline:
            return TIMEOUT, [], True
        if result.strategy is types.Strategy.NONE:
            return NO_HINT, [], True
        result.credit_hits()
        return result.strategy.value, list(result.scores), True

    def _token_keys(self, request: pb.LookupRouteRequest, model: ModelConfig | None) -> list[bytes]:
        """Our fingerprint chain of ``token_ids`` ([] when it cannot be looked up)."""
        if model is None or len(request.token_ids) > MAX_LOOKUP_TOKENS:
            return []
        if (request.hash_scheme or types.HASH_SCHEME_VLLM) != types.HASH_SCHEME_VLLM:
            return []
        return fingerprint.chain_keys(request.token_ids, model.block_size)

    async def GetCacheState(
        self, request: pb.GetCacheStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetCacheStateResponse:
        await self._read_gate(context)
        state = self._index.cache_state(request.tenant_id, request.model_id)
        return pb.GetCacheStateResponse(
            replicas=[
                pb.ReplicaStats(
                    replica_id=row.replica_id,
                    cache_memory_bytes=row.stats.cache_memory_bytes,
                    hit_rate=row.stats.hit_rate,
                    pressure=row.stats.pressure,
                )
                for row in state.replicas
            ],
            summary=pb.CacheSummary(total_prefixes=state.total_prefixes, hot_prefixes=0),
        )

    # -- writes ----------------------------------------------------------------------------------
    async def ReportCacheState(
        self,
        request_iterator: AsyncIterator[pb.CacheStateUpdate],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.Ack:
        await self._write_gate(context)
        async for msg in request_iterator:
            self._index.ingest(update_from_wire(msg))
        return pb.Ack(accepted=True)

    async def PublishEvent(
        self, request: pb.CacheEvent, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Ack:
        await self._write_gate(context)
        event = event_from_wire(request)
        if event is not None:
            self._index.apply_event(event)
        return pb.Ack(accepted=True)

    # -- streams ---------------------------------------------------------------------------------
    async def StreamCacheEvents(
        self, request: pb.StreamEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.CacheEvent]:
        await self._read_gate(context)
        wanted = {types.EventType(t) for t in request.types if t in types.EventType._value2member_map_}
        if request.types and not wanted:
            return  # only unknown types asked for: nothing can ever match
        queue: asyncio.Queue[types.Event] = asyncio.Queue(self._stream_queue_size)
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def offer(event: types.Event) -> None:
            if wanted and event.type not in wanted:
                return
            if request.model_id and event.model != request.model_id:
                return
            if request.tenant_id and event.tenant != request.tenant_id:
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._metrics.stream_events_dropped.inc()

        def listener(event: types.Event) -> None:
            if threading.get_ident() == loop_thread:
                offer(event)
            else:
                loop.call_soon_threadsafe(offer, event)

        unsubscribe = self._index.add_listener(listener)
        try:
            # Headers go out once subscribed: a client awaiting them misses no later event.
            await context.send_initial_metadata(())
            while True:
                event = await queue.get()
                yield event_to_wire(event, self._clock())
        finally:
            unsubscribe()

    async def StreamMetrics(
        self, request: pb.StreamMetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Metric]:
        await self._read_gate(context)
        names = set(request.names)
        while True:
            for metric in metric_samples(self._metrics, names, self._clock()):
                yield metric
            if self._metrics_interval_s <= 0:
                return
            await asyncio.sleep(self._metrics_interval_s)


def metric_samples(metrics: ServerMetrics, names: set[str], now: float) -> list[pb.Metric]:
    """Every current sample of the registry as ``Metric`` messages (``names`` empty = all;
    a name matches a family name or a sample name)."""
    ts = int(now * 1e6)
    out: list[pb.Metric] = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if names and family.name not in names and sample.name not in names:
                continue
            out.append(
                pb.Metric(
                    name=sample.name,
                    type=family.type,
                    labels=sample.labels,
                    value=sample.value,
                    timestamp_us=ts,
                )
            )
    return out


def authorization(metadata: Any) -> str | None:
    """The ``authorization`` metadata value (gRPC metadata keys are lower case)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None
