"""The endpoint picker's cost model: predicted time to first token per candidate replica.

Owner: ``inference_cache.extproc`` (the picker); also imported as is by the trace-replay
benchmark (``bench routing``), so it holds no server state: pure functions over narrow,
frozen views. Place in the flow::

    index match + speculative/approx match --matched_tokens--\\
    inflight.InflightTracker.load          --our load---------> Candidate --predict--> Scored
    enginestats.EngineStats                --engine gauges----/                  rank --> best first

The model (every term in milliseconds)::

    prefill_ms = max(prompt_tokens - matched_tokens, 1) / prefill_tokens_per_s
    queue_ms   = inflight_prefill_tokens / prefill_tokens_per_s      our prefill work ahead
               + inflight_requests * inflight_request_ms             every request in flight there
               + engine_running    * running_request_ms              (0 by default, see below)
               + engine_waiting    * waiting_request_ms              queued in the engine
               + kv_full_penalty_ms * ramp(kv_usage, kv_usage_threshold)
    predicted_ttft_ms = queue_ms + prefill_ms

Ranking is by a cost that adds to the prediction what recomputing costs the *other*
requests when the fleet is congested (``rank``)::

    congestion = recompute_congestion_weight * mean over candidates of
                 inflight_prefill_tokens / prefill_tokens_per_s           (seconds of backlog)
    cost_ms    = predicted_ttft_ms + congestion * prefill_ms

A request's uncached tokens occupy its replica's prefill for ``prefill_ms``, and every
request arriving there meanwhile waits that much longer: free while replicas are idle, a
real cost when every replica has a backlog. So under load a replica that holds the prefix
wins over a slightly faster one that would recompute it: fewer tokens computed fleet-wide,
no second copy of the prefix evicting other ones. ``prefill_ms`` is the same work on every
candidate when no one holds a match, so the term only ever moves a request towards its
cached prefix.

An engine always recomputes at least the last prompt token (it needs its logits), hence
the ``max(..., 1)``. ``inflight_requests`` is the tracker's *corrected* count (ours plus
what the engine's own gauges say others sent, see ``inflight``), which already includes
the engine's running requests: that is why ``running_request_ms`` defaults to 0 (set it
when the picker feeds raw gauges without the tracker correction). Unknown gauges
(``None``) count as 0: a replica we know nothing about is not penalised.

Defaults are derived from the fake engine's ``TimeModel`` defaults
(``inference_cache.fakeengine.scheduler``: ``prefill_tokens_per_second=10000``,
``decode_tokens_per_second=100``, ``max_num_seqs=256``); each field says how. They are a
starting point to be measured (``bench routing``), not a calibration of a real GPU.

Ranking is by cost, best first; exact ties (typically cold prefixes on idle
replicas) are broken by ``xxh3_64(seed ‖ replica_id)``, so requests with different seeds
spread over the replicas while one seed always picks the same one (on every server
replica: the order does not depend on process state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import xxhash

#: Tokens/s; the fake engine's ``TimeModel.prefill_tokens_per_second``.
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0


@dataclass(frozen=True, slots=True)
class ScoringSettings:
    """The ``scoring:`` configuration section: coefficients of the TTFT prediction and the
    lifetimes of the bookkeeping that feeds it (``inflight``, ``speculative``)."""

    #: Tokens per second: uncached prefill throughput of one replica. Default: the fake
    #: engine's ``prefill_tokens_per_second`` (10,000). Prices both the request's own
    #: uncached tokens and the in-flight prefill tokens queued ahead of it.
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    #: Milliseconds per request in flight on the replica (the tracker's corrected count:
    #: ours plus others'). Their prefill is priced by the token term; this is their decode
    #: share of each engine step. The fake engine's requests do not slow each other down,
    #: so it gives no value; 1 ms makes a full batch (``max_num_seqs`` = 256) weigh 256 ms,
    #: about one 2,560-token prefill: a load tie-breaker, never stronger than a real match.
    inflight_request_ms: float = 1.0
    #: Milliseconds per request the engine reports running. 0: the tracker's corrected
    #: in-flight count already contains them (see the module docstring).
    running_request_ms: float = 0.0
    #: Milliseconds per request the engine reports waiting (admission blocked by
    #: ``max_num_seqs`` or KV blocks). Each must be admitted and prefilled before ours and
    #: its size is unknown: priced as a 1,000-token prefill at 10,000 tokens/s = 100 ms.
    #: Break-even: a replica holding 8k cached tokens (800 ms of prefill saved) loses to an
    #: idle one at 9 waiting requests.
    waiting_request_ms: float = 100.0
    #: KV usage (0..1) above which the penalty starts (vLLM preempts when blocks run out;
    #: its usage counts blocks held by running requests, not evictable cached ones).
    kv_usage_threshold: float = 0.9
    #: Milliseconds of penalty at 100% KV usage, linear from the threshold. Default: with a
    #: full cache the fake engine admits the queue head only when a running request frees
    #: its blocks: about one 100-token response at 100 tokens/s (``decode_tokens_per_second``)
    #: = 1,000 ms.
    kv_full_penalty_ms: float = 1000.0
    #: Seconds a request stays counted after its ext_proc stream closed when its response
    #: end is not seen (response processing off). Default: a 500-token response at the fake
    #: engine's 100 tokens/s. Over-counting is corrected by the engine gauges when scraped.
    inflight_linger_s: float = 5.0
    #: Seconds a decision's blocks count as cached on the chosen replica before its KV
    #: events confirm them (``speculative``). Default: llm-d's ``speculativeTTL`` (2 s).
    speculative_ttl_s: float = 2.0
    #: Milliseconds of predicted TTFT we give up to keep a prefix where it is (or is being)
    #: cached: among replicas costing within this of the best (and within half the
    #: prefill their longer match saves), the one with the longest match wins. Two
    #: replicas computing one prefix waste KV memory and prefill; a burst of one new prefix
    #: would otherwise split across replicas, because waiting behind the first request's
    #: prefill costs what recomputing it elsewhere costs. Default: a few milliseconds,
    #: small against any real queue (after the Inference Extension's ``maxTTFTPenaltyMs``).
    affinity_tolerance_ms: float = 10.0
    #: Per second of the candidates' mean in-flight prefill backlog: how much more than its
    #: own prefill time a recomputed token costs in the ranking (``cost_ms`` in the module
    #: docstring). With the default 2, a fleet whose replicas each have 0.5 s of prefill
    #: queued prices recomputing at twice its duration. 0: rank by predicted TTFT alone.
    #: Default: measured (``bench routing``, ``docs/benchmarks.md``): on the Mooncake
    #: conversation trace 2 raises the hit ratio from 0.098 to 0.108 (from 0.090 to 0.099
    #: at twice the arrival rate, where TTFT p90 drops 18 %); 1 and 3 do about as well.
    recompute_congestion_weight: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"scoring.{f.name} must be a finite number >= 0, got {value!r}")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError(f"scoring.prefill_tokens_per_s must be > 0, got {self.prefill_tokens_per_s}")
        if self.speculative_ttl_s <= 0:
            raise ValueError(f"scoring.speculative_ttl_s must be > 0, got {self.speculative_ttl_s}")
        if self.kv_usage_threshold >= 1:
            raise ValueError(f"scoring.kv_usage_threshold must be < 1, got {self.kv_usage_threshold}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the scorer needs to know about one candidate replica."""

    replica_id: str
    #: Leading prompt tokens cached there (index / speculative / approximate match).
    matched_tokens: int = 0
    #: In-flight requests and their not yet prefilled tokens (``InflightTracker.load``).
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    #: The engine's last scraped gauges; ``None`` = unknown (no ``metrics_url``, no scrape).
    engine_running: float | None = None
    engine_waiting: float | None = None
    #: ``vllm:kv_cache_usage_perc`` (0..1).
    kv_usage: float | None = None


@dataclass(frozen=True, slots=True)
class Scored:
    """One candidate's prediction; ``predicted_ttft_ms = queue_ms + prefill_ms``; ``cost_ms``
    is what :func:`rank` orders by (the prediction, plus the congestion price of the
    prefill; equal to the prediction from :func:`predict` alone)."""

    replica_id: str
    predicted_ttft_ms: float
    matched_tokens: int
    queue_ms: float
    prefill_ms: float
    cost_ms: float


def _known(value: float | None) -> float:
    """A gauge as a cost input: unknown, negative or NaN -> 0."""
    if value is None or not value > 0:
        return 0.0
    return float(value)


def predict(c: Candidate, prompt_tokens: int, s: ScoringSettings, *, congestion: float = 0.0) -> Scored:
    """The predicted TTFT of a ``prompt_tokens``-token request on ``c``; its cost prices the
    prefill ``1 + congestion`` times (:func:`congestion`)."""
    ms_per_token = 1000.0 / s.prefill_tokens_per_s
    uncached = max(prompt_tokens - max(c.matched_tokens, 0), 1)
    prefill_ms = uncached * ms_per_token
    usage = _known(c.kv_usage)
    kv_ms = (
        s.kv_full_penalty_ms * min(1.0, (usage - s.kv_usage_threshold) / (1.0 - s.kv_usage_threshold))
        if usage > s.kv_usage_threshold
        else 0.0
    )
    queue_ms = (
        max(c.inflight_prefill_tokens, 0) * ms_per_token
        + max(c.inflight_requests, 0) * s.inflight_request_ms
        + _known(c.engine_running) * s.running_request_ms
        + _known(c.engine_waiting) * s.waiting_request_ms
        + kv_ms
    )
    ttft_ms = queue_ms + prefill_ms
    return Scored(
        c.replica_id, ttft_ms, c.matched_tokens, queue_ms, prefill_ms, ttft_ms + congestion * prefill_ms
    )


def congestion(cands: Sequence[Candidate], s: ScoringSettings) -> float:
    """``recompute_congestion_weight`` x the candidates' mean in-flight prefill backlog in
    seconds: the extra price of each millisecond of prefill (0 with no candidates)."""
    if not cands or not s.recompute_congestion_weight:
        return 0.0
    backlog = sum(max(c.inflight_prefill_tokens, 0) for c in cands)
    return s.recompute_congestion_weight * backlog / len(cands) / s.prefill_tokens_per_s


def tie_key(seed: bytes, replica_id: str) -> int:
    """The exact-tie order of ``replica_id`` for a request seeded with ``seed``."""
    return int(xxhash.xxh3_64_intdigest(replica_id.encode(), seed=xxhash.xxh3_64_intdigest(seed)))


def rank(cands: Sequence[Candidate], prompt_tokens: int, s: ScoringSettings, *, seed: bytes) -> list[Scored]:
    """Every candidate's prediction, lowest cost first (``cost_ms``: the predicted TTFT plus
    the :func:`congestion` price of its prefill); exact ties by :func:`tie_key`, then replica
    id (a 64-bit hash collision). Then prefix affinity: the longest match costing within
    ``affinity_tolerance_ms`` of the best goes first."""
    price = congestion(cands, s)
    scored = [predict(c, prompt_tokens, s, congestion=price) for c in cands]
    scored.sort(key=lambda x: (x.cost_ms, tie_key(seed, x.replica_id), x.replica_id))
    if len(scored) > 1:
        head = scored[0]

        def allowed(x: Scored) -> float:
            # Never more than half the prefill the longer match saves: a short shared
            # prefix must not pull every request onto one replica.
            gain_ms = 1000.0 * (x.matched_tokens - head.matched_tokens) / s.prefill_tokens_per_s
            return min(s.affinity_tolerance_ms, gain_ms / 2)

        near = [x for x in scored if x.cost_ms - head.cost_ms <= allowed(x)]
        best = max(near, key=lambda x: x.matched_tokens)  # first of equals: keeps the order
        if best is not head and best.matched_tokens > head.matched_tokens:
            scored.remove(best)
            scored.insert(0, best)
    return scored


def hit_cap(prompt_tokens: int, block_size: int) -> int:
    """The most a vLLM-like engine can report cached for a prompt: its full blocks, less
    one when the prompt ends on a block boundary (the last token is always recomputed)."""
    return max(((prompt_tokens - 1) // block_size) * block_size, 0)


def score_value(ms: float) -> float:
    """The ``LookupRoute`` wire score of a prediction: ``1 / (1 + ms)`` (in (0, 1])."""
    return 1.0 / (1.0 + max(ms, 0.0))
