"""``extproc.approx``: chunk keys, leading matches, the per-replica LRU, TTL and forgetting.

Time is a plain variable behind the injected clock; nothing else is faked.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import gc_checks
import pytest

from inference_cache.extproc.approx import ApproxIndex


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kwargs: int) -> ApproxIndex:
    return ApproxIndex(block_chars=4, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_keys_chain_full_chunks_only(clock: Clock) -> None:
    idx = make(clock)
    keys = idx.keys("m", None, b"aaaabbbbcc")
    assert len(keys) == 2  # the partial "cc" is dropped
    assert idx.keys("m", None, b"aaaabbbbccdd")[:2] == keys  # a longer prompt extends the chain
    assert idx.keys("m", None, b"xxxxbbbb")[1] != keys[1]  # a key stands for its whole prefix
    assert idx.keys("m", None, b"abc") == []


def test_keys_are_scoped_by_model_and_salt(clock: Clock) -> None:
    idx = make(clock)
    text = b"aaaabbbb"
    plain = idx.keys("m", None, text)
    assert idx.keys("m", "", text) == plain
    assert set(idx.keys("m", "s", text)).isdisjoint(plain)
    assert set(idx.keys("other", None, text)).isdisjoint(plain)
    assert idx.keys("m", None, text) == ApproxIndex(block_chars=4, clock=clock).keys("m", None, text)


def test_keys_stop_at_max_blocks(clock: Clock) -> None:
    idx = make(clock, max_blocks=3)
    assert len(idx.keys("m", None, b"x" * 400)) == 3


def test_match_counts_leading_blocks_per_candidate(clock: Clock) -> None:
    idx = make(clock)
    keys = idx.keys("m", None, b"aaaabbbbccccdddd")
    idx.record("a", keys[:2])
    idx.record("b", keys)
    idx.record("c", keys[1:])  # no first block: no leading match
    assert idx.match(keys, ["a", "b", "c", "d"]) == {"a": 2, "b": 4}
    assert idx.match(keys, ["a"]) == {"a": 2}  # only candidates are considered
    assert idx.match(idx.keys("m", None, b"zzzz"), ["a", "b"]) == {}
    assert idx.tokens(4) == 4  # 4 chunks x 4 chars / 4 chars per token


def test_capacity_evicts_least_recent_and_keeps_prompt_roots(clock: Clock) -> None:
    idx = make(clock, capacity_blocks=3)
    first = idx.keys("m", None, b"aaaabbbb")
    second = idx.keys("m", None, b"ccccdddd")
    idx.record("a", first)
    clock.now += 1
    idx.record("a", second)  # 4 keys > 3: first's tail goes, its root stays
    assert idx.size == 3
    assert idx.match(first, ["a"]) == {"a": 1}
    assert idx.match(second, ["a"]) == {"a": 2}
    idx.record("b", first)
    assert idx.match(first, ["a", "b"]) == {"a": 1, "b": 2}


def test_refresh_moves_keys_to_the_recent_end(clock: Clock) -> None:
    idx = make(clock, capacity_blocks=2)
    old = idx.keys("m", None, b"aaaa")
    idx.record("a", old)
    idx.record("a", idx.keys("m", None, b"bbbb"))
    idx.record("a", old)  # refreshed: "bbbb" is now the least recent
    idx.record("a", idx.keys("m", None, b"cccc"))
    assert idx.match(old, ["a"]) == {"a": 1}
    assert idx.match(idx.keys("m", None, b"bbbb"), ["a"]) == {}
    assert idx.size == 2


def test_entries_expire_after_ttl(clock: Clock) -> None:
    idx = ApproxIndex(block_chars=4, ttl_s=10.0, clock=clock)
    keys = idx.keys("m", None, b"aaaabbbb")
    idx.record("a", keys)
    clock.now += 9.9
    assert idx.match(keys, ["a"]) == {"a": 2}
    clock.now += 0.1
    assert idx.match(keys, ["a"]) == {}
    idx.record("a", idx.keys("m", None, b"cccc"))  # drops the expired entries
    assert idx.size == 1


def test_forget_removes_the_replica_everywhere(clock: Clock) -> None:
    idx = make(clock)
    keys = idx.keys("m", None, b"aaaabbbb")
    idx.record("a", keys)
    idx.record("b", keys)
    idx.forget("a")
    idx.forget("unknown")
    assert idx.match(keys, ["a", "b"]) == {"b": 2}
    assert idx.size == 2
    idx.forget("b")
    assert idx.size == 0
    assert idx.match(keys, ["a", "b"]) == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"block_chars": 0}, {"max_blocks": 0}, {"capacity_blocks": 0}, {"chars_per_token": 0.0}, {"ttl_s": 0.0}],
)
def test_rejects_nonsense_settings(clock: Clock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        ApproxIndex(clock=clock, **kwargs)  # type: ignore[arg-type]


def test_binary_search_agrees_with_a_linear_walk(clock: Clock) -> None:
    """Random prefix records, refreshes, expiry and a small LRU: every match equals the
    leading run a block-by-block walk over the live entries finds."""
    rng = random.Random(11)
    idx = ApproxIndex(block_chars=4, capacity_blocks=30, ttl_s=3.0, clock=clock)
    trunks = [bytes(rng.randrange(97, 100) for _ in range(4 * 12)) for _ in range(3)]
    texts = [t[: 4 * n] + bytes(rng.randrange(97, 100) for _ in range(8)) for t in trunks for n in (3, 8, 12)]
    chains = [idx.keys("m", None, t) for t in texts]

    def walk(rid: str, keys: list[int]) -> int:
        n = 0
        for key in keys:
            at = idx._lru[rid].entries.get(key) if rid in idx._lru else None  # position << 64 | µs
            if at is None or at & (1 << 64) - 1 <= int((clock.now - idx.ttl_s) * 1_000_000):
                break
            n += 1
        return n

    for _ in range(400):
        clock.now += rng.random() * 0.3
        chain = rng.choice(chains)
        idx.record(rng.choice("abc"), chain[: rng.randrange(1, len(chain) + 1)])
        query = rng.choice(chains)
        expected = {rid: n for rid in "abc" if (n := walk(rid, query))}
        assert idx.match(query, "abcd") == expected


def test_entries_stay_outside_the_cyclic_gc(clock: Clock) -> None:
    """Eight replicas' LRUs at capacity: a full collection must not walk their keys (an
    ``OrderedDict`` per replica and a ``set`` per key did, inline in a request)."""
    idx = ApproxIndex(block_chars=4, capacity_blocks=2_000, clock=clock)
    rng = random.Random(5)

    def fill() -> ApproxIndex:
        for i in range(400):
            clock.now += 0.01
            idx.record(f"10.0.0.{i % 8}:8000", [rng.getrandbits(64) for _ in range(64)])
        return idx

    growth = gc_checks.tracked_growth(fill)
    assert idx.size == 8 * 2_000
    assert growth < 50, f"{growth} GC-tracked objects kept for {idx.size} entries"
    assert gc_checks.large_tracked_containers([idx]) == []


def test_lru_order_survives_log_compaction(clock: Clock) -> None:
    """Against an ``OrderedDict`` model, over enough records to compact the log many times
    (refreshes leave stale log records that must be skipped, never evicted)."""
    idx = ApproxIndex(block_chars=4, capacity_blocks=50, ttl_s=1e9, clock=clock)
    model: OrderedDict[int, None] = OrderedDict()
    rng = random.Random(2)
    for step in range(30_000):
        key = rng.randrange(120)
        idx.record("a", [key])
        model[key] = None
        model.move_to_end(key)
        while len(model) > 50:
            model.popitem(last=False)
        if step % 997 == 0:
            assert set(idx._lru["a"]) == set(model)
    assert set(idx._lru["a"]) == set(model) and idx.size == 50
    assert idx._lru["a"]._base > 0  # the log was compacted
