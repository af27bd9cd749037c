"""Fixtures of the index tests: a fake clock and an index wired to it (no real time)."""

from __future__ import annotations

import pytest

from inference_cache.index import policy, store


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policies() -> policy.PolicyStore:
    return policy.PolicyStore()


@pytest.fixture
def index(clock: FakeClock, policies: policy.PolicyStore) -> store.Index:
    return store.Index(store.IndexSettings(max_entries=0), policies=policies, clock=clock)
