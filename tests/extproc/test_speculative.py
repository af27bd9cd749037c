"""``extproc.speculative``: leading matches of live entries, TTL (lazy and swept), refresh,
scopes and the entry bound.

Time is a plain variable behind the injected clock; nothing else is faked.
"""

from __future__ import annotations

import random

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


def test_binary_search_agrees_with_a_linear_walk(clock: Clock) -> None:
    """Random prefix records, refreshes, expiry and a small cap: every match equals the
    leading run a block-by-block walk over the live entries finds."""
    rng = random.Random(7)
    spec = SpeculativeIndex(ttl_s=2.0, clock=clock, max_entries=40)
    trunks = [[rng.randrange(50) for _ in range(16 * 12)] for _ in range(3)]
    prompts = [t[: 16 * n] + [rng.randrange(50) for _ in range(32)] for t in trunks for n in (3, 8, 12)]
    chains = [fingerprint.chain_keys(p, 16) for p in prompts]

    def walk(rid: str, keys: list[bytes]) -> int:
        n = 0
        for key in keys:
            entry = spec._scopes.get(S, {}).get(key, {}).get(rid)
            if entry is None or entry[0] <= clock.now:
                break
            n += 1
        return n

    for _ in range(400):
        clock.now += rng.random() * 0.3
        chain = rng.choice(chains)
        spec.record(S, rng.choice("abc"), chain[: rng.randrange(1, len(chain) + 1)], 16)
        query = rng.choice(chains)
        expected = {rid: n for rid in "abc" if (n := walk(rid, query))}
        assert spec.match(S, query) == expected
