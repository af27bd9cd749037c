"""``extproc.inflight``: counting, lingering, the prefill backlog and the engine correction.

Time is a plain variable behind the injected clock; nothing else is faked.
"""

from __future__ import annotations

import math

import pytest

from inference_cache.extproc.inflight import EngineGauges, InflightTracker, Load


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def tracker(clock: Clock) -> InflightTracker:
    return InflightTracker(linger_s=5.0, clock=clock, prefill_tokens_per_s=1000.0)


def test_unknown_replica_is_idle(tracker: InflightTracker) -> None:
    assert tracker.load("a") == Load(0, 0) == (0, 0)


def test_begin_and_end_count_per_replica(tracker: InflightTracker) -> None:
    t1 = tracker.begin("a", 0)
    t2 = tracker.begin("a", 0)
    tracker.begin("b", 0)
    assert tracker.load("a").requests == 2
    assert tracker.load("b").requests == 1
    tracker.end(t1, linger=False)
    assert tracker.load("a").requests == 1
    tracker.end(t2, linger=False)
    assert tracker.load("a").requests == 0
    assert tracker.load("b").requests == 1


def test_second_end_is_ignored(tracker: InflightTracker, clock: Clock) -> None:
    t = tracker.begin("a", 0)
    keep = tracker.begin("a", 0)
    tracker.end(t, linger=True)
    tracker.end(t, linger=False)
    tracker.end(t, linger=True)
    assert tracker.load("a").requests == 2  # keep + one lingering t
    clock.now += 5.0
    assert tracker.load("a").requests == 1
    tracker.end(keep, linger=False)
    tracker.end(keep, linger=False)
    assert tracker.load("a").requests == 0


def test_lingering_request_counts_until_linger_expires(tracker: InflightTracker, clock: Clock) -> None:
    t = tracker.begin("a", 0)
    clock.now += 1.0
    tracker.end(t, linger=True)
    clock.now += 4.9
    assert tracker.load("a").requests == 1
    clock.now += 0.1
    assert tracker.load("a").requests == 0


def test_prefill_backlog_queues_and_drains_by_time(tracker: InflightTracker, clock: Clock) -> None:
    tracker.begin("a", 2000)  # 2 s at 1000 tokens/s
    tracker.begin("a", 1000)  # behind it: 3 s of work in all
    assert tracker.load("a").prefill_tokens == 3000
    clock.now += 1.5
    assert tracker.load("a") == Load(2, 1500)
    clock.now += 10.0
    assert tracker.load("a") == Load(2, 0)  # prefilled, still decoding
    tracker.begin("a", 500)  # an idle server starts at now, not in the past
    assert tracker.load("a").prefill_tokens == 500


def test_completed_response_takes_its_prefill_off(tracker: InflightTracker, clock: Clock) -> None:
    first = tracker.begin("a", 2000)
    second = tracker.begin("a", 1000)
    clock.now += 0.5
    tracker.end(second, linger=False)  # it finished: its 1000 tokens are not ahead of anyone
    assert tracker.load("a") == Load(1, 1500)
    tracker.end(first, linger=False)
    assert tracker.load("a") == Load(0, 0)


def test_lingering_end_leaves_the_backlog_to_drain(tracker: InflightTracker, clock: Clock) -> None:
    t = tracker.begin("a", 2000)
    clock.now += 0.5
    tracker.end(t, linger=True)
    assert tracker.load("a") == Load(1, 1500)


def test_engine_count_corrects_under_counting(tracker: InflightTracker, clock: Clock) -> None:
    tracker.begin("a", 0)
    tracker.observe_engine("a", running=3.0, waiting=2.0, at=clock.now)
    assert tracker.load("a").requests == 5  # 1 ours + 4 someone else's
    clock.now += 1.0
    tracker.begin("a", 0)  # after the scrape: ours, on top
    assert tracker.load("a").requests == 6
    tracker.observe_engine("a", running=2.0, waiting=0.0, at=clock.now)
    assert tracker.load("a").requests == 2  # the others left


def test_engine_count_drops_stale_lingering_tickets(tracker: InflightTracker, clock: Clock) -> None:
    active = tracker.begin("a", 0)
    lingering = [tracker.begin("a", 0) for _ in range(3)]
    for t in lingering:
        tracker.end(t, linger=True)
    assert tracker.load("a").requests == 4
    tracker.observe_engine("a", running=2.0, waiting=0.0, at=clock.now)
    assert tracker.load("a").requests == 2  # two lingering tickets had really finished
    tracker.observe_engine("a", running=0.0, waiting=0.0, at=clock.now)
    assert tracker.load("a").requests == 1  # never below the tickets whose end we will see
    tracker.end(active, linger=False)
    assert tracker.load("a").requests == 0


def test_tickets_begun_after_the_scrape_are_not_corrected(tracker: InflightTracker, clock: Clock) -> None:
    scraped_at = clock.now
    clock.now += 0.5
    t = tracker.begin("a", 0)
    tracker.end(t, linger=True)  # begun after the scrape: the engine could not see it
    tracker.observe_engine("a", running=0.0, waiting=0.0, at=scraped_at)
    assert tracker.load("a").requests == 1


def test_unknown_gauges_clear_the_external_estimate(tracker: InflightTracker, clock: Clock) -> None:
    tracker.observe_engine("a", running=4.0, waiting=None, at=clock.now)
    assert tracker.load("a").requests == 4
    tracker.observe_engine("a", running=None, waiting=None, at=clock.now)
    assert tracker.load("a").requests == 0
    tracker.observe_engine("a", running=math.nan, waiting=-3.0, at=clock.now)
    assert tracker.load("a").requests == 0


def test_keeps_the_last_gauges_for_the_scorer(tracker: InflightTracker, clock: Clock) -> None:
    assert tracker.engine("a") is None
    tracker.observe_engine("a", 2.0, 1.0, kv_usage=0.5)  # scraped now by default
    assert tracker.engine("a") == EngineGauges(2.0, 1.0, 0.5, clock.now)
    assert tracker.load("a").requests == 3
    tracker.observe_engine("a", None, None, at=clock.now - 1.0)
    assert tracker.engine("a") == EngineGauges(None, None, None, clock.now - 1.0)


def test_forget_drops_the_replica_and_ignores_later_ends(tracker: InflightTracker) -> None:
    t = tracker.begin("a", 1000)
    tracker.observe_engine("a", 5.0, 0.0)
    tracker.forget("a")
    assert tracker.load("a") == Load(0, 0)
    assert tracker.engine("a") is None
    u = tracker.begin("a", 0)
    tracker.end(t, linger=False)
    assert tracker.load("a") == Load(1, 0)
    tracker.end(u, linger=False)
    assert tracker.load("a") == Load(0, 0)


@pytest.mark.parametrize("kwargs", [{"linger_s": -1.0}, {"linger_s": 1.0, "prefill_tokens_per_s": 0.0}])
def test_rejects_nonsense_settings(clock: Clock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        InflightTracker(clock=clock, **kwargs)
