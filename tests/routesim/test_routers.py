"""Routers over a hand-made fleet view: the KV-event index match, the peers' scores and
``ours`` being the picker's own scorer and bookkeeping."""

from __future__ import annotations

import random

import pytest

from inference_cache.extproc import inflight, scoring
from inference_cache.routesim import routers
from inference_cache.routesim.trace import Request

BS = 16


def fleet(n: int = 3) -> routers.Fleet:
    return routers.Fleet(n, BS)


def req(blocks: tuple[int, ...], out: int = 10) -> Request:
    return Request(0.0, len(blocks) * BS + 1, out, blocks)


def test_index_match_is_each_replicas_leading_run() -> None:
    idx = routers.PrefixIndex()
    idx.stored(0, [1, 2, 3])
    idx.stored(1, [1, 2])
    idx.stored(2, [1, 9])
    assert idx.match([1, 2, 3, 4]) == {0: 3, 1: 2, 2: 1}
    assert idx.match([7, 1]) == {}
    idx.removed(0, [2])
    assert idx.match([1, 2, 3]) == {0: 1, 1: 2, 2: 1}
    idx.removed(1, [1, 2])
    idx.removed(2, [1])
    assert idx.match([1, 2, 3]) == {0: 1}


def test_round_robin_rotates_and_random_is_seeded() -> None:
    f = fleet()
    rr = routers.RoundRobin(f, random.Random(0))
    assert [rr.decide(req((1,)))[0] for _ in range(4)] == [0, 1, 2, 0]
    picks = [routers.RandomRouter(f, random.Random(5)).decide(req((1,)))[0] for _ in range(3)]
    assert len(set(picks)) == 1


def test_least_load_counts_its_own_outstanding_requests() -> None:
    f = fleet(2)
    ll = routers.LeastLoad(f, random.Random(0))
    a, ha = ll.decide(req((1,)))
    b, _ = ll.decide(req((1,)))
    assert a != b
    ll.finished(ha)
    assert ll.decide(req((1,)))[0] == a


def test_gie_approx_follows_its_own_history_not_the_engines() -> None:
    f = fleet()
    gie = routers.GieApprox(f, random.Random(0))
    first, _ = gie.decide(req((1, 2, 3)))
    assert gie.decide(req((1, 2, 4)))[0] == first
    f.index.stored((first + 1) % 3, [5, 6])  # KV events: invisible to the approximate router
    assert gie.decide(req((5, 6)))[0] in range(3)
    assert gie.max_blocks == 256 and gie.lru_blocks == 31_250


def test_llmd_precise_weighs_prefix_against_queue_and_kv() -> None:
    f = fleet()
    f.index.stored(2, [1, 2, 3, 4])
    llmd = routers.LlmdPrecise(f, random.Random(0))
    assert llmd.decide(req((1, 2, 3, 4)))[0] == 2
    # A long queue on replica 2 (queue score 0) and a full cache outweigh the prefix (3 x 1.0).
    f.gauges = [routers.Gauges(0, 0, 0.0), routers.Gauges(0, 0, 0.0), routers.Gauges(10, 5, 1.0)]
    assert llmd.decide(req((1, 2, 3, 4)))[0] != 2


@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_dynamo_prices_uncached_prefill_and_tracks_its_load(weight: float) -> None:
    f = fleet(2)
    f.index.stored(1, [1, 2, 3, 4])
    d = routers.Dynamo(f, random.Random(0), weight)
    rid, handle = d.decide(req((1, 2, 3, 4)))
    assert rid == 1
    assert d.prefill_blocks[1] == 1 and d.active_blocks[1] == 5
    d.first_token(handle)
    d.finished(handle)
    assert d.prefill_blocks == [0, 0] and d.active_blocks == [0, 0]


def test_ours_is_the_pickers_scorer_with_speculative_and_inflight_bookkeeping() -> None:
    f = fleet()
    ours = routers.Ours(f, random.Random(0), scoring.ScoringSettings())
    blocks = tuple(range(100, 164))  # 1025 tokens
    rid, ticket = ours.decide(req(blocks))
    assert isinstance(ticket, inflight.Ticket)
    assert ours.inflight.load(f"r{rid}").prefill_tokens == 1025
    # Before any KV event: the speculative entry keeps the same prefix together (affinity).
    again, second = ours.decide(req((*blocks[:63], 999)))
    assert again == rid
    ours.finished(ticket)
    ours.finished(second)
    assert ours.inflight.load(f"r{rid}").requests == 0
    # The engine gauges it observes are the scraped ones.
    f.gauges = [routers.Gauges(3, 1, 0.5)] * 3
    f.scraped_at = 1.0
    ours.observe()
    assert ours.inflight.engine("r0") == inflight.EngineGauges(1, 3, 0.5, 1.0)


def test_ours_prefers_the_replica_the_events_say_holds_the_prefix() -> None:
    f = fleet()
    f.index.stored(1, list(range(10, 74)))
    ours = routers.Ours(f, random.Random(0), scoring.ScoringSettings())
    assert ours.decide(req(tuple(range(10, 74))))[0] == 1


def test_factories_name_every_router_with_ours_last() -> None:
    names = list(routers.factories((1.0, 2.5)))
    assert names == [
        "random",
        "round_robin",
        "least_load",
        "gie_approx",
        "dynamo_w1",
        "dynamo_w2.5",
        "llmd_precise",
        "ours",
    ]
