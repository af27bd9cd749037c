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
   with the tenant's policy (strategy gates, floors, AFFINITY_HINT, ``routingFloorScore``:
   the index's side, unchanged from the original);
2. ``token_ids`` (at most ``MAX_LOOKUP_TOKENS``), or
3. ``prompt_text`` (at most 1 MiB; wrapped as one user message, rendered with the model's
   chat template with ``add_generation_prompt`` and tokenized; the token ids are echoed in
   the response so the caller can send exactly them to the engine)
   -> the ext_proc picker's scorer (``EndpointPicker.rank``) over the model's READY
   endpoints: ``replica_scores`` = the chosen replica first, then every other replica with
   ``matched_tokens > 0`` in predicted-TTFT order; ``score = 1 / (1 + predicted_ttft_ms)``;
   ``matched_tokens`` = the index's leading match (never zeroed by a floor). Reason
   ``PREFIX_MATCH`` when the chosen replica's match >= the tenant's ``minimumMatchedTokens``
   (and >= 1 token) and the prompt has at least ``minimumPrefixTokens``; else
   ``LEAST_LOADED`` (old clients treat it as ``NO_HINT``). Scope: the model's endpoints'
   tenant from the config (the request's ``tenant_id`` is not used), ``hash_scheme``
   ``vllm`` (empty means ``vllm``; another is ``NO_HINT``), adapter ``adapter_id``. The
   policy's ``strategy.*``, ``routingFloorScore`` and ``affinityRouting`` apply to
   hash-keyed lookups only. No ready endpoint, an unknown model, or a model without a
   tokenizer (``prompt_text``) is ``NO_HINT``.

RenderTemplate (issue #8; ``docs/templates.md``): ``template_ref`` (``namespace/name``) is
looked up in the ``TemplateStore`` from the caller's namespace (``tenant_id``, else the
tenant of ``model_id``'s endpoints); a template that does not exist or is not usable from
it is ``TEMPLATE_NOT_FOUND`` (every other field empty). Variables that do not fit
(``render.RenderError``) are ``RENDER_ERROR`` with ``template_revision`` set. Otherwise
``OK``: ``rendered_prompt`` (the text, or the JSON array of the chat messages) and
``template_revision``; when ``model_id`` is a configured model with a tokenizer, also the
stable prefix keyed for it (``stable_block_hashes``, ``stable_prefix_hash`` = the last of
them, ``stable_token_count``; computed in a worker thread, cached by the store). Without
``model_id``, or for a model without a tokenizer, the keys are empty: the original's
contract (an empty ``stable_prefix_hash`` means "hash the prompt yourself"). A chat the
model's chat template cannot render is ``RENDER_ERROR``.

Deadlines: the tenant policy's ``lookupTimeoutMs`` and the caller's gRPC deadline bound the
call (``prompt_text`` without either: 5 s, as the original). Tokenization runs in a worker
thread and is abandoned at the deadline. The index lookup is CPU-bound and runs inline on
the loop (it cannot be interrupted half-way), so the deadline is checked before it and
after it: an answer that arrives late is ``TIMEOUT``, with no LFU credit. Only delivered
hash-keyed answers credit hits. A hash-keyed ``NO_HINT`` carries no scores (as the
original).

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from inference_cache import render
from inference_cache import tokenizer as tokenizer_mod
from inference_cache.config import Config
from inference_cache.extproc import auth
from inference_cache.extproc import templates as templates_mod
from inference_cache.extproc.metrics import ServerMetrics
from inference_cache.extproc.picker import EndpointPicker
from inference_cache.extproc.scoring import score_value
from inference_cache.index import policy as policy_mod
from inference_cache.index import store, types
from inference_cache.proto import pb, pb_grpc

#: The original's ``MaxLookupTokens``: longer ``token_ids`` lists get ``NO_HINT``.
MAX_LOOKUP_TOKENS = 1 << 20

#: The original's bound on ``prompt_text`` (larger -> ``NO_HINT``).
MAX_PROMPT_TEXT_BYTES = 1 << 20
#: The original's tokenization deadline for ``prompt_text`` when nothing else bounds it.
PROMPT_TEXT_TIMEOUT_S = 5.0

NO_HINT = "NO_HINT"
TIMEOUT = "TIMEOUT"
PREFIX_MATCH = "PREFIX_MATCH"
#: Token-keyed answers whose chosen replica holds less than ``minimumMatchedTokens``.
LEAST_LOADED = "LEAST_LOADED"
#: RenderTemplate's reason codes.
OK = "OK"
TEMPLATE_NOT_FOUND = "TEMPLATE_NOT_FOUND"
RENDER_ERROR = "RENDER_ERROR"


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
        picker: EndpointPicker | None = None,
        templates: templates_mod.TemplateStore | None = None,
    ) -> None:
        self._picker = picker
        self._templates = templates
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
        await self._read_gate(context)
        route = self._picker.routes.get(request.model_id) if self._picker and request.model_id else None
        namespace = request.tenant_id or (route.tenant if route is not None else "")
        store_ = self._templates
        found = store_.lookup(request.template_ref, namespace) if store_ is not None else None
        if store_ is None or found is None:
            return pb.RenderTemplateResponse(reason_code=TEMPLATE_NOT_FOUND)
        variables = dict(request.variables)
        try:
            rendered = render.render(found.spec, variables, max_value_bytes=MAX_PROMPT_TEXT_BYTES)
        except render.RenderError:
            return pb.RenderTemplateResponse(reason_code=RENDER_ERROR, template_revision=found.revision)
        response = pb.RenderTemplateResponse(
            reason_code=OK,
            rendered_prompt=templates_mod.rendered_json(rendered).encode(),
            template_revision=found.revision,
        )
        if route is None or route.tokenizer is None:
            return response
        try:
            prefix = await asyncio.to_thread(
                store_.stable_keys,
                found,
                route.tokenizer.tokenizer,
                model=route.model.name,
                block_size=route.model.block_size,
                variables=variables,
                max_value_bytes=MAX_PROMPT_TEXT_BYTES,
            )
        except (render.TemplateError, tokenizer_mod.TemplateError):
            return pb.RenderTemplateResponse(reason_code=RENDER_ERROR, template_revision=found.revision)
        response.stable_block_hashes.extend(prefix.block_keys)
        response.stable_prefix_hash = prefix.last_key
        response.stable_token_count = prefix.token_count
        return response

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
        echo: list[int] = []
        hash_keyed = bool(request.prefix_hash or request.block_hashes or request.block_token_counts)
        scores: list[types.ReplicaScore] = []
        if request.tenant_id == store.PROBE_TENANT:  # the functional self-test
            reason, measured = NO_HINT, False
        elif hash_keyed or not (request.token_ids or request.prompt_text):
            reason, scores, measured = self._lookup(request, context.time_remaining(), start)
        else:
            reason, scores, measured, echo = await self._lookup_scored(
                request, context.time_remaining(), start
            )
        elapsed = self._monotonic() - start if measured else 0.0
        self._metrics.observe_lookup(request.model_id, reason, bool(scores), elapsed)
        return pb.LookupRouteResponse(
            replica_scores=[score_to_wire(s) for s in scores],
            reason_code=reason,
            lookup_latency_us=int(elapsed * 1e6),
            token_ids=echo,
            adapter_id=request.adapter_id,
        )

    def _lookup(
        self, request: pb.LookupRouteRequest, remaining: float | None, start: float
    ) -> tuple[str, list[types.ReplicaScore], bool]:
        """Hash-keyed path -> (reason code, scores, whether the index was consulted)."""
        policy = self._policies.policy(request.tenant_id)
        budget = policy.lookup_timeout_ms / 1000 if policy.lookup_timeout_ms > 0 else None
        deadline = min((b for b in (budget, remaining) if b is not None), default=None)
        if deadline is not None and deadline <= 0:
            return TIMEOUT, [], False
        result = self._index.lookup_route(_lookup_request(request), policy)
        if deadline is not None and self._monotonic() - start > deadline:
            return TIMEOUT, [], True
        if result.strategy is types.Strategy.NONE:
            return NO_HINT, [], True
        result.credit_hits()
        return result.strategy.value, list(result.scores), True

    async def _lookup_scored(
        self, request: pb.LookupRouteRequest, remaining: float | None, start: float
    ) -> tuple[str, list[types.ReplicaScore], bool, list[int]]:
        """Token-keyed path (``token_ids`` or ``prompt_text``), scored like the ext_proc
        picker -> (reason, scores, index consulted, token ids to echo)."""
        if self._picker is None:
            return NO_HINT, [], False, []
        route = self._picker.routes.get(request.model_id)
        if route is None or (request.hash_scheme or types.HASH_SCHEME_VLLM) != types.HASH_SCHEME_VLLM:
            return NO_HINT, [], False, []
        policy = self._policies.policy(route.tenant)
        budget = policy.lookup_timeout_ms / 1000 if policy.lookup_timeout_ms > 0 else None
        if budget is None and not request.token_ids:
            budget = PROMPT_TEXT_TIMEOUT_S
        deadline = min((b for b in (budget, remaining) if b is not None), default=None)
        if deadline is not None and deadline <= 0:
            return TIMEOUT, [], False, []
        echo: list[int] = []
        if request.token_ids:
            if len(request.token_ids) > MAX_LOOKUP_TOKENS:
                return NO_HINT, [], False, []
            tokens: Sequence[int] = request.token_ids
        else:
            tok = route.tokenizer
            if tok is None or len(request.prompt_text.encode()) > MAX_PROMPT_TEXT_BYTES:
                return NO_HINT, [], False, []
            left = None if deadline is None else deadline - (self._monotonic() - start)
            try:
                tokens = await asyncio.wait_for(
                    asyncio.to_thread(tok.encode_chat, [{"role": "user", "content": request.prompt_text}]),
                    timeout=left,
                )
            except TimeoutError:
                return TIMEOUT, [], False, []
            except tokenizer_mod.TemplateError:
                return NO_HINT, [], False, []
            echo = list(tokens)
        candidates = self._picker.ready_endpoints(route)
        if not candidates or not tokens:
            return NO_HINT, [], False, echo
        prompt = self._picker.precise_prompt(route, tokens)
        ranked = self._picker.rank(route, request.adapter_id, prompt, candidates)
        if deadline is not None and self._monotonic() - start > deadline:
            return TIMEOUT, [], True, echo
        chosen = ranked.order[0]
        # The others in predicted-TTFT order (the contract), not the ranking's cost order.
        others = [s for s in ranked.order[1:] if ranked.matched.get(s.replica_id, 0) > 0]
        listed = [chosen, *sorted(others, key=lambda s: s.predicted_ttft_ms)]
        total = max(len(tokens), 1)
        scores = [
            types.ReplicaScore(
                s.replica_id,
                score_value(s.predicted_ttft_ms),
                ranked.matched.get(s.replica_id, 0),
                min(1.0, ranked.matched.get(s.replica_id, 0) / total),
            )
            for s in listed
        ]
        chosen_match = ranked.matched.get(chosen.replica_id, 0)
        floor = max(policy.minimum_matched_tokens, 1)
        prefix = chosen_match >= floor and len(tokens) >= policy.minimum_prefix_tokens
        return (PREFIX_MATCH if prefix else LEAST_LOADED), scores, True, echo

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
