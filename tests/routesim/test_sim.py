"""The event loop: deterministic for a seed, KV events reach the routers' index late or
never as configured, oversize requests counted, TTFT = queueing + prefill in virtual time."""

from __future__ import annotations

import random

import pytest

from inference_cache.routesim import routers, sim, trace
from inference_cache.routesim.engine import EngineSettings

ENGINE = EngineSettings(capacity_tokens=100_000, step_overhead_s=0.0, decode_step_s=0.0)


def workload() -> trace.Workload:
    return trace.generate("shared_prefix", seed=1, limit=80)


class Spy:
    """A round-robin router that records how many blocks its fleet index knew at each decision."""

    def __init__(self, fleet: routers.Fleet, rng: random.Random) -> None:
        self.fleet = fleet
        self.inner = routers.RoundRobin(fleet, rng)
        self.known: list[int] = []

    def decide(self, req: trace.Request) -> tuple[int, object]:
        self.known.append(len(self.fleet.index.holders))
        return self.inner.decide(req)

    def observe(self) -> None:
        return None

    def first_token(self, handle: object) -> None:
        return None

    def finished(self, handle: object) -> None:
        return None


def spied(signals: sim.Signals) -> list[int]:
    spies: list[Spy] = []

    def make(fleet: routers.Fleet, rng: random.Random) -> Spy:
        spies.append(Spy(fleet, rng))
        return spies[-1]

    sim.simulate(workload(), make, replicas=2, engine=ENGINE, signals=signals, seed=0)
    return spies[0].known


def test_a_seed_gives_the_same_run() -> None:
    ours = routers.factories()["ours"]
    a, b = (
        sim.simulate(workload(), ours, replicas=3, engine=ENGINE, signals=sim.Signals(), seed=4)
        for _ in range(2)
    )
    assert (a.cached_tokens, a.ttft_s, a.prefill_tokens) == (b.cached_tokens, b.ttft_s, b.prefill_tokens)
    assert a.prompt_tokens == sum(r.input_tokens for r in workload().requests)
    assert len(a.ttft_s) == len(a.decision_ns) == 80
    assert 0 < a.hit_ratio < 1


def test_kv_events_reach_the_index_late_or_never() -> None:
    assert max(spied(sim.Signals(event_delay_s=0.0, event_drop=0.0))) > 0
    assert max(spied(sim.Signals(event_delay_s=1e9, event_drop=0.0))) == 0
    assert max(spied(sim.Signals(event_delay_s=0.0, event_drop=1.0))) == 0


def test_ttft_of_a_lone_request_is_its_prefill() -> None:
    w = trace.Workload("one", 16, (trace.Request(5.0, 10_001, 3, tuple(range(625))),))
    res = sim.simulate(
        w, routers.factories()["round_robin"], replicas=1, engine=ENGINE, signals=sim.Signals(), seed=0
    )
    assert res.ttft_s == [pytest.approx(10_001 / ENGINE.prefill_tokens_per_s)]
    assert res.prefill_tokens == [10_001] and res.oversize == 0


def test_requests_larger_than_a_replica_run_uncached_and_are_counted() -> None:
    small = EngineSettings(capacity_tokens=1_000)
    res = sim.simulate(
        workload(), routers.factories()["ours"], replicas=2, engine=small, signals=sim.Signals(), seed=0
    )
    assert res.oversize == 80
    assert res.cached_tokens == 0
