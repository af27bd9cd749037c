"""The endpoint picker: one request in, the engine replica that will serve it fastest out.

Owner: ``inference_cache.extproc`` (built by ``serve``; called by ``protocol`` for Envoy and by
``grpc_api`` for ``LookupRoute``). Data flow, one step per module::

    PickRequest --openai.parse--> ParsedRequest (400/404/413 as Rejection)
      --resolve model/LoRA--> Route (tenant, endpoints, block size, tokenizer)
      --candidates--> ready endpoints of the model, filtered by the subset hint (503 if none)
      --templates (a templated request only)--> render the PromptTemplate, rewrite the body
                                 into a plain OpenAI request (Decision.body), parse that
      --tokenizer--> token ids  (render + prefix-cache probe inline; a long uncached rest
                                 in a worker thread, bounded by the matching deadline)
      --fingerprint.chain_keys--> block keys (salted by cache_salt; a chat continues the
                                 keys cached beside its token prefix: only new blocks hashed)
         (``matching: bytes``, chat requests: render, then index.bytematch walks the
          rendered bytes over the model's ByteIndex: the matched blocks' keys, no tokenizing)
      --Index.longest_prefix + SpeculativeIndex.match (continuing each replica's index
                                 run)--> matched tokens per replica
      --InflightTracker.load + engine gauges--> scoring.Candidate views
      --scoring.rank--> predicted TTFT order --> Decision (primary + fallbacks)

Without a tokenizer for the model, or without KV events from all its endpoints, the match
is approximate (``approx``: character chunks, learned from our own decisions) and reported
as such (and so is a model with ``matching: approximate``). A model with ``matching: auto``
(the default) or ``bytes``, a byte-recoverable tokenizer and KV events from every endpoint
(``choose_matching``, again on every endpoint change) matches chat requests without
special tokens by bytes (``bytes``: the matched blocks are exact, the prompt length is
estimated from bytes); its decisions are recorded as speculative entries on the matched
blocks and fixed byte chunks past them (``bytematch.speculative_keys``), and other
requests take the token path (counted in ``byte_fallbacks``). When matching overruns its
deadline the request is routed on load alone (counted). ``finished`` closes the in-flight
ticket; the protocol's observer compares the engine's reported ``usage`` with the
prediction.

A templated request (body field ``template`` or header ``x-inference-cache-template``)
names a PromptTemplate instead of carrying ``prompt`` / ``messages``: the template must be
usable from the request's namespace (its tenant: the trusted tenant header, else the
model's endpoints' tenant), else 404 ``template_not_found``; a text template goes to
``/v1/completions``, a chat template to ``/v1/chat/completions``; bad variables are a 400
naming ``template.variables.<slot>``. The engine gets the rendered request (``Decision.body``)
and routing runs on exactly that request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

from inference_cache import config as config_mod
from inference_cache import enginestats
from inference_cache import render as render_mod
from inference_cache import tokenizer as tokenizer_mod
from inference_cache.extproc import approx, inflight, openai, scoring, speculative
from inference_cache.extproc import templates as templates_mod
from inference_cache.extproc.picking import (
    Decision,
    ErrorKind,
    Outcome,
    PickRequest,
    Rejection,
)
from inference_cache.index import bytekeys, bytematch, fingerprint, store, types
from inference_cache.index import policy as policy_mod

log = logging.getLogger(__name__)

#: Request header naming the tenant whose policy applies (only with ``--tenant-header``).
TENANT_HEADER = "x-inference-cache-tenant"
#: Request header naming the PromptTemplate (``namespace/name``) of a templated request.
TEMPLATE_HEADER = "x-inference-cache-template"
#: Matching deadline when the tenant's policy sets no ``lookupTimeoutMs``.
DEFAULT_MATCH_TIMEOUT_MS = 1000
#: Characters left to tokenize after the prefix cache up to which we tokenize on the event
#: loop (~0.5 ms of BPE): below it a worker-thread hop costs more than it saves.
INLINE_TOKENIZE_CHARS = 2048
#: Block-key chains (block size x cache_salt) kept per cached token prefix (``block_keys``).
BLOCK_KEY_VARIANTS = 4

#: The matching a model runs (``Route.matching``; the ``mode`` of ``inferencecache_matching_mode``).
MODE_TOKENS = "tokens"
MODE_BYTES = "bytes"
MODE_APPROXIMATE = "approximate"

#: How a decision's match was obtained (the ``match`` label of the decision metrics).
MATCH_PRECISE = "precise"
MATCH_BYTES = "bytes"  # precise, by the rendered prompt's bytes (``matching: bytes``)
MATCH_APPROX = "approximate"
MATCH_NONE = "none"  # no prompt (bodiless, other paths)
MATCH_TIMEOUT = "timeout"  # deadline overrun: load only
MATCH_UNTOKENIZABLE = "untokenizable"  # the template or tokenizer refused it: load only

#: Why a request of a model matched by bytes took the token path (``byte_fallbacks``).
FALLBACK_NOT_CHAT = "not_chat"  # a completions request
FALLBACK_SPECIAL_TOKENS = "add_special_tokens"
FALLBACK_TEMPLATE = "template_error"  # the chat template refused it (tokenizing says why)
FALLBACK_AFFIXES = "special_affixes"  # the tokenizer appends tokens bytes cannot place


@dataclass(frozen=True, slots=True)
class Route:
    """A model as the picker routes it (built once from the config)."""

    model: config_mod.ModelConfig
    tenant: str
    endpoints: tuple[str, ...]
    #: Exact tokenization with a per-model prefix cache (``None``: approximate matching).
    tokenizer: tokenizer_mod.CachedChatEncoder | None
    #: Every endpoint of the model publishes KV events (else: approximate matching).
    events: bool = True
    #: Byte matching of chat requests, when the model runs it (``None``: tokens only).
    bytes: bytematch.ByteMatcher | None = None
    #: What the model runs: ``tokens``, ``bytes`` or ``approximate`` (``choose_matching``).
    matching: str = MODE_TOKENS
    #: Why not what was asked for (empty when it is), for the log and ``/metrics``.
    matching_reason: str = ""
    #: The model's byte matcher whether used or not (endpoint changes may turn it on).
    byte_matcher: bytematch.ByteMatcher | None = None

    @property
    def precise(self) -> bool:
        return self.matching != MODE_APPROXIMATE


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the request asks the engine to prefill, keyed for matching."""

    #: Token ids (precise) or ``None`` (approximate / no prompt).
    tokens: tuple[int, ...] | None
    #: Prompt length in tokens (estimated from characters when approximate).
    total_tokens: int
    #: Block keys: our fingerprint chain (precise).
    keys: Sequence[bytes]
    match: str
    #: Approximate chunk keys (approximate matching only).
    approx_keys: Sequence[int] = ()
    #: Per-prompt tie-break seed: equal prefixes break exact ties alike, others spread.
    seed: bytes = bytes(8)
    #: Speculative chunk keys past ``keys`` (a byte match: ``bytematch.speculative_keys``).
    chunks: Sequence[bytes] = ()
    #: Tokens one of ``chunks`` stands for.
    chunk_tokens: int = 0

    @property
    def chain(self) -> Sequence[bytes]:
        """The keys speculative entries are recorded and matched on (a new list when there
        are chunks: read it once)."""
        return [*self.keys, *self.chunks] if self.chunks else self.keys

    @property
    def keyed(self) -> bool:
        """Matched by keys (precise or bytes) and has some: ``chain`` is not empty."""
        return self.match in (MATCH_PRECISE, MATCH_BYTES) and bool(self.keys or self.chunks)


@dataclass(slots=True)
class Ranked:
    """The scorer's answer for one request."""

    order: list[scoring.Scored]
    #: Leading matched tokens per replica as the KV index knows them (before capping; the
    #: speculative and approximate matches only steer the scoring).
    matched: dict[str, int]
    prompt: Prompt
    #: Leading matched blocks per replica in the KV index (the speculative entries of a
    #: decision start past them).
    indexed_blocks: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _State:
    ticket: inflight.Ticket
    model: str
    match: str
    replica: str


@dataclass(frozen=True, slots=True)
class PickerSettings:
    routing: str = "cache-aware"
    fallback_endpoints: int = 0
    tenant_header: bool = False
    debug_header: bool = False
    limits: openai.Limits = field(default_factory=openai.Limits)
    scoring: scoring.ScoringSettings = field(default_factory=scoring.ScoringSettings)


class EndpointPicker:
    """Implements ``picking.Picker``; also the scorer behind token-keyed ``LookupRoute``."""

    def __init__(
        self,
        config: config_mod.Config,
        index: store.Index,
        policies: policy_mod.PolicyStore,
        *,
        settings: PickerSettings | None = None,
        tokenizers: Mapping[str, tokenizer_mod.PromptTokenizer] | None = None,
        is_ready: Callable[[str], bool] = lambda _rid: True,
        observer: PickObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        templates: templates_mod.TemplateStore | None = None,
        byte_indexes: Mapping[str, bytekeys.ByteIndex] | None = None,
    ) -> None:
        """``byte_indexes``: model -> its ``ByteIndex`` (fed by the subscribers) for the
        models with ``matching: bytes`` whose table is byte-recoverable (``serve`` builds them)."""
        self.settings = settings or PickerSettings()
        #: The PromptTemplates of templated requests (``None``: every template is unknown).
        self.templates = templates
        self._index = index
        self._policies = policies
        self._is_ready = is_ready
        self._observer = observer
        self._clock = clock
        s = self.settings.scoring
        self.inflight = inflight.InflightTracker(
            linger_s=s.inflight_linger_s, clock=clock, prefill_tokens_per_s=s.prefill_tokens_per_s
        )
        self.speculative = speculative.SpeculativeIndex(ttl_s=s.speculative_ttl_s, clock=clock)
        self.approx = approx.ApproxIndex(clock=clock)
        #: (model, ``ByteMatch.boundary``) -> byte-matched requests (``/metrics``).
        self.byte_boundaries: collections.Counter[tuple[str, str]] = collections.Counter()
        #: (model, ``FALLBACK_*``) -> requests of a byte-matched model on the token path.
        self.byte_fallbacks: collections.Counter[tuple[str, str]] = collections.Counter()
        # An engine restart or resync clears its blocks in the index; our guesses of what it
        # would cache (speculative entries) go with them.
        index.add_clear_listener(lambda rid, _model, _tenant: self.speculative.forget(rid))
        self._rr = itertools.count()
        tokenizers = tokenizers or {}
        byte_indexes = byte_indexes or {}
        self.routes: dict[str, Route] = {}
        #: LoRA adapter name -> (base model, adapter).
        self._adapters: dict[str, tuple[str, str]] = {}
        for m in config.models:
            eps = tuple(e.address for e in config.endpoints if e.model == m.name)
            tok = tokenizers.get(m.name)
            encoder = tokenizer_mod.CachedChatEncoder(tok) if tok is not None else None
            events = all(e.kv_events for e in config.endpoints if e.model == m.name)
            bidx = byte_indexes.get(m.name)
            matcher = (
                bytematch.ByteMatcher(tok.tokenizer, bidx)
                if tok is not None and bidx is not None and bidx.table.recoverable
                else None
            )
            route = _with_matching(
                Route(m, config.tenant_of(m.name), eps, encoder, events, byte_matcher=matcher)
            )
            self.routes[m.name] = route
            _log_matching(route, bidx)
            for a in m.lora_adapters:
                self._adapters[a.name] = (m.name, a.name)
        self._all_endpoints = tuple(e.address for e in config.endpoints)

    # -- the Picker protocol ---------------------------------------------------------------
    async def pick(self, request: PickRequest) -> Decision | Rejection:
        start = time.perf_counter()
        decision: Decision | Rejection
        try:
            decision = await self._pick(request)
        except Rejection as rejection:
            decision = rejection
        if self._observer is not None:
            state = decision.state if isinstance(decision, Decision) else None
            model, match = (state.model, state.match) if isinstance(state, _State) else ("", MATCH_NONE)
            self._observer.decided(decision, time.perf_counter() - start, model, match)
        return decision

    def finished(self, decision: Decision, outcome: Outcome) -> None:
        state = decision.state
        if isinstance(state, _State):
            self.inflight.end(state.ticket, linger=not outcome.response_complete)

    # -- steps -------------------------------------------------------------------------------
    async def _pick(self, request: PickRequest) -> Decision:
        if openai.api_of(request.path) is None or (request.method == "GET" and not request.body):
            return self._load_only(request)
        limits = self.settings.limits
        header = request.headers.get(TEMPLATE_HEADER) or None
        parsed = openai.parse(request.path, request.body, limits, template_name=header)
        route, adapter = self.resolve(parsed.model)
        candidates = self._candidates(route.endpoints, request.subset)
        tenant = self._tenant(route, request.headers)
        body = None
        if parsed.template is not None:
            body = self._render_template(parsed, parsed.template, request.body, tenant)
            parsed = openai.parse(request.path, body, limits)
        policy = self._policies.policy(tenant)
        prompt = await self._prompt(route, parsed, adapter, policy)
        ranked = self.rank(route, adapter, prompt, candidates)
        decision = self._decide(route, adapter, ranked)
        decision.body = body
        return decision

    def _render_template(
        self, parsed: openai.ParsedRequest, ref: openai.TemplateRef, body: bytes, namespace: str
    ) -> bytes:
        """A templated request's body rewritten for the engine; ``Rejection`` on any error."""
        if parsed.prompts or parsed.token_ids or parsed.messages:
            carried = "prompt" if parsed.api == "completions" else "messages"
            raise Rejection(
                ErrorKind.BAD_REQUEST,
                f"A request names a template or carries '{carried}', not both.",
                "template",
            )
        found = self.templates.lookup(ref.name, namespace) if self.templates is not None else None
        if found is None:
            raise Rejection(
                ErrorKind.TEMPLATE_NOT_FOUND,
                f"The template `{ref.name}` does not exist or is not usable from namespace `{namespace}`.",
                "template.name",
            )
        if found.spec.is_chat != (parsed.api == "chat"):
            kind, path = (
                ("a chat", "/v1/chat/completions") if found.spec.is_chat else ("a text", "/v1/completions")
            )
            raise Rejection(
                ErrorKind.BAD_REQUEST,
                f"The template `{found.ref}` is {kind} template: send it to {path}.",
                "template.name",
            )
        try:
            rendered = render_mod.render(
                found.spec, ref.variables, max_value_bytes=self.settings.limits.max_text_bytes
            )
        except render_mod.RenderError as e:
            raise Rejection(
                ErrorKind.BAD_REQUEST,
                f"Invalid 'template.variables.{e.slot}': {e.message} (template `{found.ref}`).",
                f"template.variables.{e.slot}",
            ) from e
        return templates_mod.rewrite(json.loads(body), rendered)

    def resolve(self, model: str) -> tuple[Route, str]:
        """Model name (or LoRA adapter name) -> (route, adapter); 404 when unknown."""
        route = self.routes.get(model)
        if route is not None:
            return route, ""
        base = self._adapters.get(model)
        if base is not None:
            return self.routes[base[0]], base[1]
        raise Rejection(ErrorKind.MODEL_NOT_FOUND, f"The model `{model}` does not exist.", "model")

    def set_endpoints(self, model: str, endpoints: Sequence[config_mod.EndpointConfig]) -> None:
        """Replace ``model``'s endpoints at runtime (serve's endpoint discovery). The route
        takes their tenant (kept when there are none) and its matching is chosen again
        (``choose_matching``: precise only if all of them publish KV events, bytes only
        then). Unknown models are ignored."""
        route = self.routes.get(model)
        if route is None:
            return
        new = _with_matching(
            dataclasses.replace(
                route,
                endpoints=tuple(e.address for e in endpoints),
                tenant=endpoints[0].tenant if endpoints else route.tenant,
                events=all(e.kv_events for e in endpoints),
            )
        )
        self.routes[model] = new
        if new.matching != route.matching:
            _log_matching(new, None, changed=True)
        self._all_endpoints = tuple(e for r in self.routes.values() for e in r.endpoints)

    def ready_endpoints(self, route: Route) -> list[str]:
        return [e for e in route.endpoints if self._is_ready(e)]

    def precise_prompt(
        self,
        route: Route,
        tokens: Sequence[int],
        salt: str | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> Prompt:
        """``tokens`` keyed for matching; ``keys``: their block keys when already known."""
        if keys is None:
            keys = fingerprint.chain_keys(tokens, route.model.block_size, salt=salt)
        seed = keys[0] if keys else text_seed(",".join(map(str, tokens)).encode())
        return Prompt(tuple(tokens), len(tokens), keys, MATCH_PRECISE, seed=seed)

    def observe_engine(self, replica_id: str, stats: enginestats.EngineStats | None) -> None:
        """The engine's own load gauges (``metrics_url`` scrape) correct our in-flight view;
        ``None`` (a failed scrape) forgets the last gauges rather than trust stale ones."""
        if stats is None:
            self.inflight.observe_engine(replica_id, None, None)
            return
        self.inflight.observe_engine(
            replica_id,
            running=stats.num_requests_running,
            waiting=stats.num_requests_waiting,
            kv_usage=stats.kv_cache_usage_perc,
        )

    def sweep(self, max_keys: int | None = None) -> bool:
        """Drop expired speculative entries, at most about ``max_keys`` of them (the server
        calls it every second, in slices); ``True`` while more have expired."""
        self.speculative.sweep(max_keys)
        return self.speculative.expired

    def _candidates(self, endpoints: Sequence[str], subset: Sequence[str] | None) -> list[str]:
        allowed = set(subset) if subset is not None else None
        out = [e for e in endpoints if (allowed is None or e in allowed) and self._is_ready(e)]
        if not out:
            why = "no ready endpoint in the subset hint" if subset is not None else "no ready endpoint"
            raise Rejection(ErrorKind.NO_ENDPOINT, f"{why} for this model")
        return out

    def _tenant(self, route: Route, headers: Mapping[str, str]) -> str:
        if self.settings.tenant_header:
            value = headers.get(TENANT_HEADER)
            if value:
                return value
        return route.tenant

    async def _prompt(
        self,
        route: Route,
        parsed: openai.ParsedRequest,
        adapter: str,
        policy: policy_mod.NamespacePolicy,
    ) -> Prompt:
        if route.tokenizer is None or route.matching == MODE_APPROXIMATE:
            text = openai.approx_text(parsed)
            akeys = self.approx.keys(route.model.name + "\0" + adapter, parsed.cache_salt, text)
            total = max(1, int(len(text) / self.approx.chars_per_token))
            seed = akeys[0].to_bytes(8, "big") if akeys else text_seed(text)
            return Prompt(None, total, (), MATCH_APPROX, akeys, seed)
        if route.bytes is not None:
            if parsed.api != "chat":
                self.byte_fallbacks[route.model.name, FALLBACK_NOT_CHAT] += 1
            elif parsed.add_special_tokens:
                self.byte_fallbacks[route.model.name, FALLBACK_SPECIAL_TOKENS] += 1
            else:
                by_bytes = self._byte_prompt(route, route.tokenizer, route.bytes, parsed, adapter)
                if by_bytes is not None:
                    return by_bytes
        budget_ms = policy.lookup_timeout_ms if policy.lookup_timeout_ms > 0 else DEFAULT_MATCH_TIMEOUT_MS
        try:
            tokens, keys = await self._tokenize(
                route.tokenizer, parsed, budget_ms / 1000, route.model.block_size
            )
        except TimeoutError:
            text = openai.approx_text(parsed)
            return Prompt(None, max(1, len(text) // 4), (), MATCH_TIMEOUT, seed=text_seed(text))
        except Exception as exc:  # TemplateError, or tokenizers' plain Exception
            # The engine will refuse or handle it itself; we route on load alone.
            log.debug("tokenize_failed", extra={"model": route.model.name, "error": str(exc)})
            text = openai.approx_text(parsed)
            return Prompt(None, max(1, len(text) // 4), (), MATCH_UNTOKENIZABLE, seed=text_seed(text))
        return self.precise_prompt(route, tokens, parsed.cache_salt, keys)

    def _byte_prompt(
        self,
        route: Route,
        tok: tokenizer_mod.CachedChatEncoder,
        matcher: bytematch.ByteMatcher,
        parsed: openai.ParsedRequest,
        adapter: str,
    ) -> Prompt | None:
        """The chat request matched by its rendered bytes, inline (``None``: the token path
        decides, e.g. the template refused it and tokenizing reports why)."""
        model = route.model.name
        try:
            text = render(tok, parsed)
        except Exception:  # TemplateError and friends: the token path classifies it
            self.byte_fallbacks[model, FALLBACK_TEMPLATE] += 1
            return None
        data = matcher.request_bytes(text)
        if data is None:
            self.byte_fallbacks[model, FALLBACK_AFFIXES] += 1
            return None
        scope = types.Scope(route.tenant, model, types.HASH_SCHEME_VLLM, adapter)
        m = matcher.match(scope, data, salt=parsed.cache_salt)
        self.byte_boundaries[model, m.boundary] += 1
        bs = route.model.block_size
        chunks = bytematch.speculative_keys(data, m, bs, salt=parsed.cache_salt)
        return Prompt(
            None,
            m.estimated_total_tokens(bs),
            m.keys,
            MATCH_BYTES,
            seed=text_seed(data),
            chunks=chunks,
            chunk_tokens=m.chunk_tokens(bs),
        )

    async def _tokenize(
        self,
        tok: tokenizer_mod.CachedChatEncoder,
        parsed: openai.ParsedRequest,
        budget_s: float,
        block_size: int,
    ) -> tuple[list[int], list[bytes] | None]:
        """Token ids as the engine makes them, and for a chat their block keys (unsalted or
        salted by ``cache_salt``; ``None``: the caller keys them). Rendering and the
        prefix-cache probe run inline (cheap); the rest runs inline when short (a follow-up
        turn: a thread hop would cost more), else in a worker thread bounded by
        ``budget_s``."""
        if parsed.api == "chat" and not parsed.add_special_tokens:
            text = render(tok, parsed)
            probe = tok.lookup(text)
            if len(text) - probe.start <= INLINE_TOKENIZE_CHARS:
                encoded = tok.finish_entry(text, probe)
            else:
                encoded = await asyncio.wait_for(
                    asyncio.to_thread(tok.finish_entry, text, probe), timeout=budget_s
                )
            return encoded.ids, block_keys(probe, encoded, block_size, parsed.cache_salt)
        if parsed.api == "completions" and parsed.token_ids:
            return list(parsed.token_ids[0]), None
        tokens = await asyncio.wait_for(asyncio.to_thread(tokenize, tok, parsed), timeout=budget_s)
        return tokens, None

    def rank(self, route: Route, adapter: str, prompt: Prompt, candidates: Sequence[str]) -> Ranked:
        """Score ``candidates`` for ``prompt``: predicted TTFT order (pure read of the index,
        the speculative and approximate indexes and the in-flight load)."""
        bs = route.model.block_size
        indexed: dict[str, int] = {}
        indexed_blocks: dict[str, int] = {}
        matched: dict[str, int] = {}
        if prompt.keyed:
            scope = types.Scope(route.tenant, route.model.name, types.HASH_SCHEME_VLLM, adapter)
            if prompt.keys:
                for m in self._index.longest_prefix(scope, prompt.keys):
                    indexed[m.replica_id] = m.matched_tokens
                    indexed_blocks[m.replica_id] = m.matched_blocks
            matched.update(indexed)
            for rid, n in self.speculative.match_tokens(scope, prompt.chain, indexed_blocks, indexed).items():
                matched[rid] = max(matched.get(rid, 0), n)
        elif prompt.match == MATCH_APPROX and prompt.approx_keys:
            for rid, blocks in self.approx.match(prompt.approx_keys, candidates).items():
                matched[rid] = self.approx.tokens(blocks)
        # An engine always recomputes the last prompt token: a full hit is one block short.
        exact = prompt.tokens is not None or prompt.match == MATCH_BYTES
        cap = scoring.hit_cap(prompt.total_tokens, bs) if exact else prompt.total_tokens
        views = self.inflight.candidates(candidates, matched, cap)
        order = scoring.rank(views, prompt.total_tokens, self.settings.scoring, seed=prompt.seed)
        return Ranked(order, indexed, prompt, indexed_blocks)

    def _decide(self, route: Route, adapter: str, ranked: Ranked) -> Decision:
        order = ranked.order
        if self.settings.routing == "round-robin":
            n = next(self._rr)
            rotated = sorted(order, key=lambda s: s.replica_id)
            k = n % len(rotated)
            order = rotated[k:] + rotated[:k]
        shed = self.settings.limits.shed_ttft_ms
        if shed > 0 and all(s.predicted_ttft_ms > shed for s in order):
            raise Rejection(
                ErrorKind.SHED,
                f"every replica is predicted over {shed:g} ms to first token; retry later",
            )
        chosen = order[0]
        prompt = ranked.prompt
        uncached = max(prompt.total_tokens - chosen.matched_tokens, 1)
        ticket = self.inflight.begin(chosen.replica_id, uncached)
        if prompt.keyed:
            scope = types.Scope(route.tenant, route.model.name, types.HASH_SCHEME_VLLM, adapter)
            held = ranked.indexed_blocks.get(chosen.replica_id, 0)  # the index has these
            rid = chosen.replica_id
            self.speculative.record(scope, rid, prompt.keys, route.model.block_size, start=held)
            if prompt.chunks:
                self.speculative.record(scope, rid, prompt.chunks, prompt.chunk_tokens)
        elif prompt.match == MATCH_APPROX and prompt.approx_keys:
            self.approx.record(chosen.replica_id, prompt.approx_keys)
        endpoints = tuple(s.replica_id for s in order[: 1 + self.settings.fallback_endpoints])
        debug = explain(route.model.name, prompt.match, order) if self.settings.debug_header else None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decision", extra={"decision": explain(route.model.name, prompt.match, order)})
        return Decision(
            endpoints=endpoints,
            debug=debug,
            predicted_prompt_tokens=prompt.total_tokens if prompt.tokens is not None else None,
            predicted_cached_tokens=(
                chosen.matched_tokens if prompt.tokens is not None or prompt.match == MATCH_BYTES else None
            ),
            state=_State(ticket, route.model.name, prompt.match, chosen.replica_id),
        )

    def _load_only(self, request: PickRequest) -> Decision:
        """Bodiless requests and non-inference paths: the least loaded ready endpoint."""
        candidates = self._candidates(self._all_endpoints, request.subset)
        views = self.inflight.candidates(candidates, {}, 0)
        order = scoring.rank(views, 1, self.settings.scoring, seed=request.path.encode())
        return Decision(endpoints=tuple(s.replica_id for s in order[: 1 + self.settings.fallback_endpoints]))


def choose_matching(route: Route) -> tuple[str, str]:
    """(what ``route`` runs, why: empty when it runs what its config asked for).

    ``approximate`` without a tokenizer, without KV events from every endpoint (only a
    replica whose events we subscribe to ourselves carries the token ids a byte index
    needs, and only those the index holds precisely), or when asked for; ``bytes`` for
    ``auto`` / ``bytes`` with a byte-recoverable tokenizer; else ``tokens``."""
    asked = route.model.matching
    if asked == MODE_APPROXIMATE:
        return MODE_APPROXIMATE, ""
    if route.tokenizer is None:
        return MODE_APPROXIMATE, "no tokenizer"
    if not route.events:
        return MODE_APPROXIMATE, "an endpoint has no kv_events"
    if asked == MODE_TOKENS:
        return MODE_TOKENS, ""
    if route.byte_matcher is not None:
        return MODE_BYTES, ""
    return MODE_TOKENS, "the tokenizer is not byte-recoverable"


def _with_matching(route: Route) -> Route:
    mode, why = choose_matching(route)
    return dataclasses.replace(
        route,
        matching=mode,
        matching_reason=why,
        bytes=route.byte_matcher if mode == MODE_BYTES else None,
    )


def _log_matching(route: Route, bidx: bytekeys.ByteIndex | None, *, changed: bool = False) -> None:
    """A warning when ``bytes`` was asked for and cannot be used; an endpoint change that
    changes the mode at info; else debug (``serve`` logs every model's mode at startup)."""
    asked = route.model.matching
    extra = {"model": route.model.name, "requested": asked, "mode": route.matching}
    if route.matching_reason:
        table = bidx.table.reason if bidx is not None else ""
        extra["reason"] = f"{route.matching_reason}: {table}" if table else route.matching_reason
    if asked == MODE_BYTES and route.matching != MODE_BYTES:
        level = logging.WARNING
    else:
        level = logging.INFO if changed else logging.DEBUG
    log.log(level, "matching_mode", extra=extra)


def render(tok: tokenizer_mod.CachedChatEncoder, parsed: openai.ParsedRequest) -> str:
    """The chat request's prompt text, rendered as the engine renders it."""
    fmt = tok.tokenizer.content_format(tools=parsed.tools)
    return tok.tokenizer.render_chat(
        tokenizer_mod.vllm_conversation(parsed.messages, fmt),
        add_generation_prompt=parsed.add_generation_prompt,
        continue_final_message=parsed.continue_final_message,
        tools=parsed.tools,
        chat_template_kwargs=parsed.chat_template_kwargs,
    )


def tokenize(tok: tokenizer_mod.CachedChatEncoder, parsed: openai.ParsedRequest) -> list[int]:
    """Token ids exactly as the engine makes them (vLLM's OpenAI server rules)."""
    if parsed.api == "chat":
        return tok.encode_text(render(tok, parsed), add_special_tokens=parsed.add_special_tokens)
    if parsed.token_ids:
        return list(parsed.token_ids[0])
    text = parsed.prompts[0] if parsed.prompts else ""
    return tok.tokenizer.encode(text, add_special_tokens=parsed.add_special_tokens)


def block_keys(
    probe: tokenizer_mod.Probe, encoded: tokenizer_mod.Encoded, block_size: int, salt: str | None
) -> list[bytes]:
    """``fingerprint.chain_keys(encoded.ids, block_size, salt=salt)``, hashing only the
    blocks past the keys cached beside the probe's prefix (a follow-up turn: its new
    blocks); then the keys of the result's cached prefix are kept beside it."""
    memo = (block_size, salt or "")
    known = probe.block_keys.get(memo) if probe.hit else None
    if known:
        rest = fingerprint.prefix_hashes(
            encoded.ids, block_size, parent=fingerprint.key_int(known[-1]), start=len(known) * block_size
        )
        keys = [*known, *map(fingerprint.key_bytes, rest)]
    else:
        keys = fingerprint.chain_keys(encoded.ids, block_size, salt=salt)
    cached = encoded.cached // block_size
    if cached and memo not in encoded.block_keys:
        if len(encoded.block_keys) >= BLOCK_KEY_VARIANTS:
            encoded.block_keys.clear()
        encoded.block_keys[memo] = tuple(keys[:cached])
    return keys


def text_seed(text: bytes) -> bytes:
    """A tie-break seed from a prompt's leading bytes (when it has no block key)."""
    return xxhash.xxh64_digest(text[:4096])


def explain(model: str, match: str, order: Sequence[scoring.Scored]) -> str:
    """A compact JSON account of a decision (debug log, ``x-inference-cache-decision``)."""
    return json.dumps(
        {
            "model": model,
            "match": match,
            "ranked": [
                {
                    "endpoint": s.replica_id,
                    "matched_tokens": s.matched_tokens,
                    "predicted_ttft_ms": round(s.predicted_ttft_ms, 3),
                }
                for s in order[:8]
            ],
        },
        separators=(",", ":"),
    )


class PickObserver(Protocol):
    """Metrics hook of the picker (``metrics.ExtProcMetrics``)."""

    def decided(self, decision: Decision | Rejection, seconds: float, model: str, match: str) -> None: ...
