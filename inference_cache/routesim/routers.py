"""The routers compared by ``bench routing``, each deciding from what it could see in a
real fleet.

Owner: ``inference_cache.routesim``. Place in the flow::

    sim --Fleet (lagged KV-event index, scraped gauges, virtual now)--> Router.decide(request)
        --> (replica, handle); sim --handle--> Router.first_token / Router.finished

What each router sees:

- ``random`` (seeded), ``round_robin``: nothing.
- ``least_load``: its own outstanding requests per replica (Envoy's least-request).
- ``gie_approx``: the Inference Extension's default profile (``anchors.md`` §1.6): prefix
  score = matched / total blocks from its own routing history (per-replica LRU of
  ``lruCapacityPerServer`` 31,250 x 16 tokens, the first ``maxPrefixBlocksToMatch`` 256 x 16
  tokens; a block counts for every replica holding it, until a block nobody holds), queue
  score = min-max of scraped ``num_requests_waiting``, KV score = 1 - scraped KV usage,
  weights prefix 3 / queue 2 / KV 2, max score, ties at random.
- ``llmd_precise``: the same weighted scorers with the exact prefix from the KV-event index
  (llm-d's precise prefix-cache scorer, ``anchors.md`` §2.2; no speculative indexing).
- ``dynamo_w{N}``: Dynamo's KV router cost (``anchors.md`` §5), lowest wins, temperature 0:
  ``N x (prefill blocks in flight + this request's uncached blocks) + active blocks``, the
  overlap from the KV-event index, the loads tracked locally (added on route, prefill
  cleared at first token, blocks freed at finish).
- ``ours``: the ext_proc picker's own parts, imported: ``scoring.rank`` over
  ``scoring.Candidate`` views built as ``EndpointPicker.rank`` builds them (KV-event index
  match, max'ed with ``SpeculativeIndex.match_tokens`` continued from it, capped one block
  short of the prompt; ``InflightTracker.load`` and the gauges it observed), then
  ``EndpointPicker._decide``'s bookkeeping (``InflightTracker.begin`` with the uncached
  tokens, ``SpeculativeIndex.record`` of the blocks past the index's match; ``end`` at
  finish). The clock is the simulation's.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from inference_cache.extproc import inflight, scoring, speculative
from inference_cache.routesim.trace import Request

#: GIE's approximate prefix defaults (in 16-token blocks).
GIE_LRU_TOKENS = 31_250 * 16
GIE_MAX_PREFIX_TOKENS = 256 * 16
#: Default weights of the GIE profile and llm-d's well-lit precise config.
W_PREFIX, W_QUEUE, W_KV = 3.0, 2.0, 2.0


@dataclass(frozen=True, slots=True)
class Gauges:
    waiting: int
    running: int
    kv_usage: float


class PrefixIndex:
    """What KV events tell a precise router: block id -> replicas holding it."""

    def __init__(self) -> None:
        self.holders: dict[int, set[int]] = {}

    def stored(self, rid: int, blocks: Sequence[int]) -> None:
        holders = self.holders
        for b in blocks:
            h = holders.get(b)
            if h is None:
                holders[b] = {rid}
            else:
                h.add(rid)

    def removed(self, rid: int, blocks: Sequence[int]) -> None:
        holders = self.holders
        for b in blocks:
            h = holders.get(b)
            if h is not None:
                h.discard(rid)
                if not h:
                    del holders[b]

    def match(self, blocks: Sequence[int]) -> dict[int, int]:
        """Leading blocks held per replica (only replicas with >= 1)."""
        holders = self.holders
        out: dict[int, int] = {}
        alive: set[int] | None = None
        n = 0
        for b in blocks:
            h = holders.get(b)
            if not h:
                break
            if alive is None:
                alive = set(h)
            else:
                gone = alive - h
                for r in gone:
                    out[r] = n
                alive -= gone
                if not alive:
                    break
            n += 1
        for r in alive or ():
            out[r] = n
        return out


class Fleet:
    """The router-visible state of one simulated fleet (written by ``sim``)."""

    def __init__(self, n: int, block_tokens: int) -> None:
        self.n = n
        self.block_tokens = block_tokens
        self.now = 0.0
        self.index = PrefixIndex()
        self.gauges = [Gauges(0, 0, 0.0)] * n
        self.scraped_at = 0.0


class Router(Protocol):
    def decide(self, req: Request) -> tuple[int, object]: ...

    def observe(self) -> None:
        """The fleet's gauges were just scraped."""

    def first_token(self, handle: object) -> None: ...

    def finished(self, handle: object) -> None: ...


class _Base:
    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        self.fleet = fleet
        self.rng = rng

    def observe(self) -> None:
        return None

    def first_token(self, handle: object) -> None:
        return None

    def finished(self, handle: object) -> None:
        return None

    def _best(self, scores: Sequence[float], *, lowest: bool = False) -> int:
        """The index of the best score; ties at random."""
        target = min(scores) if lowest else max(scores)
        best = [i for i, v in enumerate(scores) if v == target]
        return best[0] if len(best) == 1 else self.rng.choice(best)


class RandomRouter(_Base):
    def decide(self, req: Request) -> tuple[int, object]:
        return self.rng.randrange(self.fleet.n), None


class RoundRobin(_Base):
    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self._next = 0

    def decide(self, req: Request) -> tuple[int, object]:
        rid = self._next
        self._next = (rid + 1) % self.fleet.n
        return rid, None


class LeastLoad(_Base):
    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self.outstanding = [0] * fleet.n

    def decide(self, req: Request) -> tuple[int, object]:
        rid = self._best(self.outstanding, lowest=True)
        self.outstanding[rid] += 1
        return rid, rid

    def finished(self, handle: object) -> None:
        assert isinstance(handle, int)
        self.outstanding[handle] -= 1


def _queue_kv_scores(gauges: Sequence[Gauges]) -> list[float]:
    """GIE's queue-scorer (x2) + kv-cache-utilization-scorer (x2) per replica."""
    waits = [g.waiting for g in gauges]
    lo, hi = min(waits), max(waits)
    return [
        W_QUEUE * ((hi - g.waiting) / (hi - lo) if hi > lo else 1.0) + W_KV * (1.0 - g.kv_usage)
        for g in gauges
    ]


class GieApprox(_Base):
    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        super().__init__(fleet, rng)
        bs = fleet.block_tokens
        self.lru_blocks = max(1, GIE_LRU_TOKENS // bs)
        self.max_blocks = max(1, GIE_MAX_PREFIX_TOKENS // bs)
        self.lrus: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(fleet.n)]
        self.pods: dict[int, set[int]] = {}

    def decide(self, req: Request) -> tuple[int, object]:
        blocks = req.blocks[: self.max_blocks]
        match = [0] * self.fleet.n
        for b in blocks:
            pods = self.pods.get(b)
            if not pods:
                break
            for p in pods:
                match[p] += 1
        total = len(blocks) or 1
        base = _queue_kv_scores(self.fleet.gauges)
        scores = [W_PREFIX * match[i] / total + base[i] for i in range(self.fleet.n)]
        rid = self._best(scores)
        self._add(rid, blocks)
        return rid, None

    def _add(self, rid: int, blocks: Sequence[int]) -> None:
        lru = self.lrus[rid]
        for b in blocks:
            if b in lru:
                lru.move_to_end(b)
                continue
            lru[b] = None
            self.pods.setdefault(b, set()).add(rid)
            if len(lru) > self.lru_blocks:
                old, _ = lru.popitem(last=False)
                pods = self.pods[old]
                pods.discard(rid)
                if not pods:
                    del self.pods[old]


class LlmdPrecise(_Base):
    def decide(self, req: Request) -> tuple[int, object]:
        matched = self.fleet.index.match(req.blocks)
        total = len(req.blocks) or 1
        base = _queue_kv_scores(self.fleet.gauges)
        scores = [W_PREFIX * matched.get(i, 0) / total + base[i] for i in range(self.fleet.n)]
        return self._best(scores), None


class _DynamoLoad(NamedTuple):
    rid: int
    prefill_blocks: int
    blocks: int


class Dynamo(_Base):
    def __init__(self, fleet: Fleet, rng: random.Random, weight: float) -> None:
        super().__init__(fleet, rng)
        self.weight = weight
        self.prefill_blocks = [0] * fleet.n
        self.active_blocks = [0] * fleet.n

    def decide(self, req: Request) -> tuple[int, object]:
        bs = self.fleet.block_tokens
        matched = self.fleet.index.match(req.blocks)
        total = -(-(req.input_tokens + req.output_tokens) // bs)
        prompt = -(-req.input_tokens // bs)
        costs = [
            self.weight * (self.prefill_blocks[i] + prompt - matched.get(i, 0))
            + self.active_blocks[i]
            + total
            for i in range(self.fleet.n)
        ]
        rid = self._best(costs, lowest=True)
        uncached = prompt - matched.get(rid, 0)
        self.prefill_blocks[rid] += uncached
        self.active_blocks[rid] += total
        return rid, _DynamoLoad(rid, uncached, total)

    def first_token(self, handle: object) -> None:
        assert isinstance(handle, _DynamoLoad)
        self.prefill_blocks[handle.rid] -= handle.prefill_blocks

    def finished(self, handle: object) -> None:
        assert isinstance(handle, _DynamoLoad)
        self.active_blocks[handle.rid] -= handle.blocks


#: ``speculative`` scope of the simulated model (one model, one tenant).
_SCOPE = "sim"


class Ours(_Base):
    """The ext_proc picker's scorer and bookkeeping (see the module docstring)."""

    def __init__(self, fleet: Fleet, rng: random.Random, settings: scoring.ScoringSettings) -> None:
        super().__init__(fleet, rng)
        self.settings = settings

        def clock() -> float:
            return fleet.now

        self.inflight = inflight.InflightTracker(
            linger_s=settings.inflight_linger_s,
            clock=clock,
            prefill_tokens_per_s=settings.prefill_tokens_per_s,
        )
        self.speculative = speculative.SpeculativeIndex(ttl_s=settings.speculative_ttl_s, clock=clock)
        self.ids = [f"r{i}" for i in range(fleet.n)]
        self._rid = {name: i for i, name in enumerate(self.ids)}

    def observe(self) -> None:
        at = self.fleet.scraped_at
        for name, g in zip(self.ids, self.fleet.gauges, strict=True):
            self.inflight.observe_engine(name, g.running, g.waiting, at, kv_usage=g.kv_usage)

    def decide(self, req: Request) -> tuple[int, object]:
        bs = self.fleet.block_tokens
        keys = [b.to_bytes(8, "big") for b in req.blocks]
        indexed = {self.ids[r]: n for r, n in self.fleet.index.match(req.blocks).items()}
        matched = {name: n * bs for name, n in indexed.items()}
        if keys:
            for name, n in self.speculative.match_tokens(_SCOPE, keys, indexed).items():
                matched[name] = max(matched.get(name, 0), n)
        views = self.inflight.candidates(self.ids, matched, scoring.hit_cap(req.input_tokens, bs))
        seed = keys[0] if keys else req.input_tokens.to_bytes(8, "big")
        chosen = scoring.rank(views, req.input_tokens, self.settings, seed=seed)[0]
        ticket = self.inflight.begin(chosen.replica_id, max(req.input_tokens - chosen.matched_tokens, 1))
        if keys:
            self.speculative.record(
                _SCOPE, chosen.replica_id, keys, bs, start=indexed.get(chosen.replica_id, 0)
            )
        return self._rid[chosen.replica_id], ticket

    def finished(self, handle: object) -> None:
        assert isinstance(handle, inflight.Ticket)
        self.inflight.end(handle, linger=False)


RouterFactory = Callable[[Fleet, random.Random], Router]


def factories(
    dynamo_weights: Sequence[float] = (1.0, 4.0), settings: scoring.ScoringSettings | None = None
) -> dict[str, RouterFactory]:
    """Every router by its JSON name, in report order (``ours`` last)."""
    ours_settings = settings or scoring.ScoringSettings()
    out: dict[str, RouterFactory] = {
        "random": RandomRouter,
        "round_robin": RoundRobin,
        "least_load": LeastLoad,
        "gie_approx": GieApprox,
    }
    for w in dynamo_weights:

        def make(fleet: Fleet, rng: random.Random, w: float = w) -> Router:
            return Dynamo(fleet, rng, w)

        out[f"dynamo_w{w:g}"] = make
    out["llmd_precise"] = LlmdPrecise

    def make_ours(fleet: Fleet, rng: random.Random) -> Router:
        return Ours(fleet, rng, ours_settings)

    out["ours"] = make_ours
    return out
