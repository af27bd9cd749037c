"""``extproc.speculative``: leading matches of live entries, TTL (lazy and swept), refresh,
scopes and the entry bound.

Time is a plain variable behind the injected clock; nothing else is faked.
"""

from __future__ import annotations

import random

import gc_checks
import pytest

from inference_cache.extproc.speculative import SpeculativeIndex
from inference_cache.index import fingerprint, types

S = types.Scope("t", "m", "vllm")
KEYS = [bytes([i]) * 8 for i in range(4)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def spec(clock: Clock) -> SpeculativeIndex:
    return SpeculativeIndex(ttl_s=2.0, clock=clock)


def test_match_counts_leading_blocks_per_replica(spec: SpeculativeIndex) -> None:
    spec.record(S, "a", KEYS[:2], 16)
    spec.record(S, "b", KEYS, 16)
    spec.record(S, "c", KEYS[1:], 16)  # no first block: no leading match
    assert spec.match(S, KEYS) == {"a": 2, "b": 4}
    assert spec.match_tokens(S, KEYS) == {"a": 32, "b": 64}
    assert spec.match(S, [b"\xff" * 8, *KEYS]) == {}
    assert spec.match(S, []) == {}


def test_scopes_do_not_mix(spec: SpeculativeIndex) -> None:
    spec.record(S, "a", KEYS, 16)
    other = types.Scope("t", "m", "vllm", adapter="sql")
    assert spec.match(other, KEYS) == {}
    assert spec.match(types.Scope("t", "m", "vllm"), KEYS) == {"a": 4}  # equal scopes match


def test_entries_expire_after_ttl(spec: SpeculativeIndex, clock: Clock) -> None:
    spec.record(S, "a", KEYS, 16)
    clock.now += 1.0
    spec.record(S, "b", KEYS[:1], 16)
    clock.now += 0.9
    assert spec.match(S, KEYS) == {"a": 4, "b": 1}
    clock.now += 0.1  # a's entries are 2 s old
    assert spec.match(S, KEYS) == {"b": 1}
    assert spec.size == 5  # lazily: still held
    assert spec.sweep() == 4
    clock.now += 1.0
    assert spec.match(S, KEYS) == {}
    assert spec.sweep() == 1
    assert spec.size == 0


def test_sweep_in_slices_of_keys(spec: SpeculativeIndex, clock: Clock) -> None:
    for replica in ("a", "b", "c"):
        spec.record(S, replica, KEYS, 16)
    assert not spec.expired
    clock.now += 2.0
    assert spec.expired
    # A slice stops after the recording that reached the budget: 4 keys, then 4 more.
    assert spec.sweep(max_keys=5) == 8
    assert spec.expired and spec.size == 4
    assert spec.sweep(max_keys=5) == 4
    assert not spec.expired and spec.size == 0
    assert spec.sweep(max_keys=5) == 0


def test_record_drops_expired_entries(spec: SpeculativeIndex, clock: Clock) -> None:
    spec.record(S, "a", KEYS, 16)
    clock.now += 2.0
    spec.record(S, "b", KEYS[:1], 16)
    assert spec.size == 1


def test_refresh_extends_life(spec: SpeculativeIndex, clock: Clock) -> None:
    spec.record(S, "a", KEYS, 16)
    clock.now += 1.5
    spec.record(S, "a", KEYS[:2], 16)
    clock.now += 1.0
    assert spec.match(S, KEYS) == {"a": 2}
    assert spec.sweep() == 2
    assert spec.size == 2


def test_bounded_memory_drops_the_oldest_recordings_whole(clock: Clock) -> None:
    spec = SpeculativeIndex(clock=clock, max_entries=3)
    spec.record(S, "a", KEYS[:2], 16)
    spec.record(S, "b", KEYS[:2], 16)  # 4 entries > 3: a's recording goes
    assert spec.size == 2
    assert spec.match(S, KEYS) == {"b": 2}
    spec.record(S, "b", KEYS[:3], 16)  # refreshes b's two and adds one: still within bounds
    assert spec.size == 3
    assert spec.match(S, KEYS) == {"b": 3}


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0.0}, {"max_entries": 0}])
def test_rejects_nonsense_settings(clock: Clock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        SpeculativeIndex(clock=clock, **kwargs)  # type: ignore[arg-type]


def test_record_from_start_continues_the_index_run(spec: SpeculativeIndex) -> None:
    """The picker records only the blocks past the index's match and matches from there."""
    spec.record(S, "a", KEYS, 16, start=2)  # the index holds KEYS[:2] on a
    assert spec.size == 2
    assert spec.match(S, KEYS) == {}  # no entry for the first block: nothing from 0
    assert spec.match(S, KEYS, after={"a": 2}) == {"a": 4}  # counts the index's two
    assert spec.match_tokens(S, KEYS, after={"a": 2}) == {"a": 64}
    assert spec.match(S, KEYS, after={"a": 1}) == {}  # KEYS[1] is not speculative: no run
    assert spec.match(S, KEYS, after={"b": 2}) == {}  # other replicas recorded nothing
    assert spec.match(S, KEYS[:2], after={"a": 2}) == {}  # the index already has it all
    spec.record(S, "b", KEYS, 16)  # b recorded whole: found from block 0 ...
    assert spec.match(S, KEYS, after={"a": 2}) == {"a": 4, "b": 4}
    assert spec.match(S, KEYS, after={"a": 2, "b": 3}) == {"a": 4, "b": 4}  # ... or from 3
    spec.record(S, "c", KEYS, 16, start=4)  # nothing past the index: nothing recorded
    assert spec.size == 6
    with pytest.raises(ValueError, match="start"):
        spec.record(S, "a", KEYS, 16, start=-1)


def test_match_agrees_with_a_linear_walk(clock: Clock) -> None:
    """Random records (whole or past a random index match), refreshes, expiry and a small
    cap: every match equals the run a block-by-block walk over the live entries finds from
    the index's match of each replica."""
    rng = random.Random(7)
    spec = SpeculativeIndex(ttl_s=2.0, clock=clock, max_entries=40)
    trunks = [[rng.randrange(50) for _ in range(16 * 12)] for _ in range(3)]
    prompts = [t[: 16 * n] + [rng.randrange(50) for _ in range(32)] for t in trunks for n in (3, 8, 12)]
    chains = [fingerprint.chain_keys(p, 16) for p in prompts]

    def walk(rid: str, keys: list[bytes], start: int) -> int:
        n = start
        suffix = spec._suffixes.get(rid)
        for key in keys[start:]:
            entry = spec._scopes.get(S, {}).get(key + suffix) if suffix is not None else None
            if entry is None or entry >> 24 <= int(clock.now * 1_000_000):  # expires_us << 24
                break
            n += 1
        return n if n > start else 0

    for _ in range(600):
        clock.now += rng.random() * 0.3
        chain = rng.choice(chains)
        n = rng.randrange(1, len(chain) + 1)
        spec.record(S, rng.choice("abc"), chain[:n], 16, start=rng.choice((0, 0, rng.randrange(n))))
        query = rng.choice(chains)
        after = {rid: rng.randrange(len(query) + 1) for rid in "abc" if rng.random() < 0.5}
        expected = {rid: n for rid in "abc" if (n := walk(rid, query, after.get(rid, 0)))}
        assert spec.match(S, query, after) == expected
        if not after:
            assert spec.match(S, query) == expected


def test_a_chain_of_mixed_recordings_counts_each_entrys_tokens(spec: SpeculativeIndex) -> None:
    """A byte match: its blocks (16 tokens each), then byte chunks (128 tokens each)."""
    chunks = [bytes([9, i]) * 4 for i in range(2)]
    spec.record(S, "a", KEYS[:3], 16, start=1)  # the index holds block 0 on a
    spec.record(S, "a", chunks, 128)
    chain = [*KEYS[:3], *chunks]
    assert spec.match(S, chain, {"a": 1}) == {"a": 5}
    assert spec.match_tokens(S, chain, {"a": 1}, {"a": 16}) == {"a": 16 + 2 * 16 + 2 * 128}
    # without the index's tokens, its blocks count at the first live entry's size
    assert spec.match_tokens(S, chain, {"a": 1}) == {"a": 16 + 2 * 16 + 2 * 128}
    assert spec.match_tokens(S, chain, {"a": 1}, {"a": 20}) == {"a": 20 + 2 * 16 + 2 * 128}


def test_entries_stay_outside_the_cyclic_gc(clock: Clock) -> None:
    """A burst of long first turns leaves ~100k live entries: a full collection must not
    walk them (it took 10-15 ms of CPU per collection before, inline in a request)."""
    spec = SpeculativeIndex(ttl_s=2.0, clock=clock)
    rng = random.Random(3)

    def burst() -> SpeculativeIndex:
        for i in range(200):
            spec.record(S, f"10.0.0.{i % 4}:8000", [rng.randbytes(8) for _ in range(256)], 16)
        return spec

    growth = gc_checks.tracked_growth(burst)
    assert spec.size == 200 * 256
    assert growth < 250, f"{growth} GC-tracked objects kept for {spec.size} entries"
    assert gc_checks.large_tracked_containers([spec]) == []
