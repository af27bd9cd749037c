"""The frozen ``/snapshot`` wire format: exact bytes for fixed indexes, Go float32 and
RFC 3339 nano formatting, ``null`` lists, omitted empty tenant."""

from __future__ import annotations

import pytest

from inference_cache.index import snapshot, store, types

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.5, "0.5"),
        (0.1, "0.1"),
        (1 / 3, "0.33333334"),
        (0.78, "0.78"),
        (1.0, "1"),
        (123456789.0, "123456790"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-10, "1.5e-10"),
        (1e21, "1e+21"),
        (-0.25, "-0.25"),
        (0.0, "0"),
        (float("nan"), "0"),
    ],
)
def test_go_float32(value: float, text: str) -> None:
    assert snapshot.go_float32(value) == text


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (None, "0001-01-01T00:00:00Z"),
        (1_700_000_000 * 10**9, "2023-11-14T22:13:20Z"),
        (1_700_000_000 * 10**9 + 500_000_000, "2023-11-14T22:13:20.5Z"),
        (1_700_000_000 * 10**9 + 123_456_789, "2023-11-14T22:13:20.123456789Z"),
        (1_700_000_000 * 10**9 + 1_000, "2023-11-14T22:13:20.000001Z"),
    ],
)
def test_rfc3339_nano(ns: int | None, text: str) -> None:
    assert snapshot.rfc3339_nano(ns) == text


def test_empty_index_encodes_null_lists() -> None:
    index = store.Index(clock=lambda: T0)
    assert (
        snapshot.encode_json(index.snapshot())
        == b'{"replicas":null,"tenants":null,"totalPrefixes":0,"hotPrefixes":0}'
    )


def test_seed_example_bytes() -> None:
    index = store.Index(clock=lambda: T0)
    index.set_stats(
        tenant="ns-a", model="m", replica_id="vllm-0", stats=types.ReplicaStats(100, 0.5, 0.25), ts=T0
    )
    index.blocks_stored(
        types.Scope("ns-a", "m", "vllm"), "vllm-0", [b"a", b"b", b"c"], [16, 32, 48], T0 + 500
    )
    assert snapshot.encode_json(index.snapshot()) == (
        b'{"replicas":[{"replicaId":"vllm-0","tenant":"ns-a","cacheMemoryBytes":100,"hitRate":0.5,'
        b'"pressure":0.25,"lastUpdate":"2023-11-14T22:13:20Z","prefixCount":3,'
        b'"lastEventAt":"2023-11-14T22:21:40Z"}],'
        b'"tenants":[{"tenantId":"ns-a","memoryUsed":100,"indexEntries":3,"hitRate":0.5}],'
        b'"totalPrefixes":3,"hotPrefixes":0}'
    )


def test_mixed_index_bytes() -> None:
    index = store.Index(clock=lambda: T0)
    # Two models for the same (tenant, replica): the latest stats win; entries add up.
    index.set_stats(tenant="t", model="m1", replica_id="r<1>", stats=types.ReplicaStats(7, 0.9, 0.9), ts=T0)
    index.set_stats(
        tenant="t", model="m2", replica_id="r<1>", stats=types.ReplicaStats(10, 0.1, 1e-7), ts=T0 + 0.5
    )
    index.set_stats(tenant="t", model="m1", replica_id="r2", stats=types.ReplicaStats(20, 0.2, 0.0), ts=T0)
    index.blocks_stored(types.Scope("t", "m1", "vllm"), "r<1>", [b"k"], [16], T0 + 1.25)
    index.blocks_stored(types.Scope("t", "m2", "vllm"), "r<1>", [b"k"], [16], T0)
    index.blocks_stored(types.Scope("", "m1", "vllm"), "solo", [b"k"], [16], T0)
    assert snapshot.encode_json(index.snapshot()) == (
        b'{"replicas":['
        b'{"replicaId":"solo","cacheMemoryBytes":0,"hitRate":0,"pressure":0,'
        b'"lastUpdate":"0001-01-01T00:00:00Z","prefixCount":1,"lastEventAt":"2023-11-14T22:13:20Z"},'
        b'{"replicaId":"r2","tenant":"t","cacheMemoryBytes":20,"hitRate":0.2,"pressure":0,'
        b'"lastUpdate":"2023-11-14T22:13:20Z","prefixCount":0,"lastEventAt":"0001-01-01T00:00:00Z"},'
        b'{"replicaId":"r\\u003c1\\u003e","tenant":"t","cacheMemoryBytes":10,"hitRate":0.1,"pressure":1e-7,'
        b'"lastUpdate":"2023-11-14T22:13:20.5Z","prefixCount":2,"lastEventAt":"2023-11-14T22:13:21.25Z"}],'
        b'"tenants":[{"tenantId":"","memoryUsed":0,"indexEntries":1,"hitRate":0},'
        b'{"tenantId":"t","memoryUsed":30,"indexEntries":2,"hitRate":0.15}],'
        b'"totalPrefixes":3,"hotPrefixes":0}'
    )
