"""The discrete-event loop of ``bench routing``: one workload through one router and N
simulated replicas, in virtual time; plus the router-independent references.

Owner: ``inference_cache.routesim``. Place in the flow::

    Workload --arrivals--> simulate: Fleet view --Router.decide--> Replica.enqueue/start
        heap of (prefill done, finish) events --> Replica.prefilled/release, Router hooks
        Replica BlockStored/BlockRemoved --delay, drop--> Fleet.index (what precise routers see)
        Replica gauges --every scrape_interval_s--> Fleet.gauges, Router.observe
    --> RunResult (hits, TTFTs, per-replica prefill work, decision wall times)

Signals reach routers as in a real fleet: KV events arrive ``event_delay_s`` after the
engine publishes them and each batch is lost with probability ``event_drop`` (seeded);
gauges are re-scraped at a decision when ``scrape_interval_s`` has passed since the last
scrape. Everything but the decision wall times is deterministic for a seed.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from inference_cache.routesim.engine import Emit, EngineSettings, Job, Replica
from inference_cache.routesim.routers import Fleet, Gauges, RouterFactory
from inference_cache.routesim.trace import Workload

_PREFILLED, _FINISHED = 0, 1


@dataclass(frozen=True, slots=True)
class Signals:
    """How stale the routers' view is."""

    event_delay_s: float = 0.05
    event_drop: float = 0.001
    scrape_interval_s: float = 0.05

    def __post_init__(self) -> None:
        if self.event_delay_s < 0 or self.scrape_interval_s < 0 or not 0 <= self.event_drop <= 1:
            raise ValueError("event_delay_s, scrape_interval_s must be >= 0, event_drop in [0, 1]")


@dataclass(slots=True)
class RunResult:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    #: Prompt tokens computed per replica.
    prefill_tokens: list[int] = field(default_factory=list)
    decision_ns: list[int] = field(default_factory=list)
    #: Requests larger than a replica's whole cache, run uncached.
    oversize: int = 0
    #: Requests that waited at the queue head for KV blocks.
    stalls: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def simulate(
    workload: Workload,
    factory: RouterFactory,
    *,
    replicas: int,
    engine: EngineSettings,
    signals: Signals,
    seed: int,
) -> RunResult:
    bs = workload.block_tokens
    fleet = Fleet(replicas, bs)
    router = factory(fleet, random.Random(seed))
    drop_rng = random.Random(seed + 1)
    # (deliver at, stored?, replica, blocks), in delivery order (the delay is constant).
    pending: deque[tuple[float, bool, int, list[int]]] = deque()

    def emitter(stored: bool) -> Emit:
        def emit(rid: int, blocks: list[int]) -> None:
            if signals.event_drop and drop_rng.random() < signals.event_drop:
                return
            pending.append((fleet.now + signals.event_delay_s, stored, rid, blocks))

        return emit

    fleet_replicas = [Replica(i, engine, bs, emitter(True), emitter(False)) for i in range(replicas)]
    heap: list[tuple[float, int, int, int, Job]] = []
    seq = 0
    result = RunResult()

    def start(rid: int) -> None:
        nonlocal seq
        started = fleet_replicas[rid].start()
        if started is not None:
            job, duration = started
            seq += 1
            heapq.heappush(heap, (fleet.now + duration, seq, _PREFILLED, rid, job))

    def step() -> None:
        nonlocal seq
        t, _seq, kind, rid, job = heapq.heappop(heap)
        fleet.now = t
        replica = fleet_replicas[rid]
        if kind == _PREFILLED:
            replica.prefilled(job)
            result.ttft_s.append(t - job.arrival_s)
            result.cached_tokens += job.hit_tokens
            result.oversize += job.oversize
            router.first_token(job.handle)
            seq += 1
            heapq.heappush(heap, (t + job.request.output_tokens * engine.tpot_s, seq, _FINISHED, rid, job))
        else:
            replica.release(job)
            router.finished(job.handle)
        start(rid)

    scraped = False
    for req in workload.requests:
        while heap and heap[0][0] <= req.arrival_s:
            step()
        fleet.now = req.arrival_s
        index = fleet.index
        while pending and pending[0][0] <= fleet.now:
            _at, stored, rid, blocks = pending.popleft()
            (index.stored if stored else index.removed)(rid, blocks)
        if not scraped or fleet.now - fleet.scraped_at >= signals.scrape_interval_s:
            fleet.gauges = [Gauges(r.num_waiting, r.num_running, r.kv_usage) for r in fleet_replicas]
            fleet.scraped_at = fleet.now
            scraped = True
            router.observe()
        t0 = time.perf_counter_ns()
        rid, handle = router.decide(req)
        result.decision_ns.append(time.perf_counter_ns() - t0)
        result.prompt_tokens += req.input_tokens
        fleet_replicas[rid].enqueue(Job(req, handle))
        start(rid)
    while heap:
        step()
    result.prefill_tokens = [r.prefill_tokens for r in fleet_replicas]
    result.stalls = sum(r.stalls for r in fleet_replicas)
    return result


def _prefix_hit(cache: set[int] | OrderedDict[int, None], blocks: tuple[int, ...], cap: int) -> int:
    n = 0
    for b in blocks[:cap]:
        if b not in cache:
            break
        n += 1
    return n


def infinite_hit_ratio(workload: Workload) -> float:
    """Hit ratio of one cache that never evicts (a bound for every router)."""
    bs = workload.block_tokens
    seen: set[int] = set()
    hits = total = 0
    for r in workload.requests:
        hits += _prefix_hit(seen, r.blocks, (r.input_tokens - 1) // bs) * bs
        total += r.input_tokens
        seen.update(r.blocks)
    return hits / total if total else 0.0


def pooled_lru_hit_ratio(workload: Workload, capacity_tokens: int) -> float:
    """Hit ratio of one LRU cache of ``capacity_tokens`` in arrival order, a released
    prompt's tail evicted before its head ("one giant vLLM": a reference, not a bound)."""
    bs = workload.block_tokens
    cap_blocks = max(1, capacity_tokens // bs)
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for r in workload.requests:
        hits += _prefix_hit(cache, r.blocks, (r.input_tokens - 1) // bs) * bs
        total += r.input_tokens
        for b in reversed(r.blocks):
            cache[b] = None
            cache.move_to_end(b)
        while len(cache) > cap_blocks:
            cache.popitem(last=False)
    return hits / total if total else 0.0
