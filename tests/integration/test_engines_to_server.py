"""Fake engines -> KV events -> the server's index -> LookupRoute, checked against what the
engines themselves report.

Every follow-up is looked up with its token ids, sent to a replica, and the replica's
``usage.prompt_tokens_details.cached_tokens`` must equal the index's ``matched_tokens`` for
that replica, capped the way the engine caps a hit (whole blocks, the last prompt token is
always recomputed: at most ``(len - 1) // block_size`` blocks). Engines run in-process with
the tiny tokenizer; their events travel over ``ipc://`` in a temp dir. The policy floors are
off (``minimumMatchedTokens`` 0, ``routingFloorScore`` 0) so every holder is scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from inference_cache import demo

from .conftest import (
    BS,
    SYNC_S,
    TINY_TOKENIZER,
    cap,
    floors_off,
    full_blocks,
    lookup,
    send,
    text,
    tokens,
)

#: 47 usable blocks per engine: a 40-block prompt evicts part of an earlier 10-block one.
NUM_GPU_BLOCKS = 48


@pytest.fixture
async def cluster() -> AsyncIterator[demo.Cluster]:
    settings = demo.DemoSettings(tokenizer=TINY_TOKENIZER, engines=3, num_gpu_blocks=NUM_GPU_BLOCKS)
    async with contextlib.AsyncExitStack() as stack:
        c = await demo.start_cluster(settings, stack)
        floors_off(c.server, settings.tenant)
        await c.connect(SYNC_S)
        yield c


def common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def check_on(c: demo.Cluster, engine: str, ids: Sequence[int]) -> tuple[int, int]:
    """Look ``ids`` up, send them to ``engine``: its hit must be the index's matched tokens
    for it (0 when the index lists it nowhere), capped like an engine hit."""
    matched = dict(await lookup(c, ids)).get(engine, 0)
    cached = await send(c, engine, ids)
    assert cached == min(matched, cap(ids)), (engine, matched, cached, len(ids))
    return matched, cached


async def test_follow_ups_land_on_the_longest_prefix(cluster: demo.Cluster) -> None:
    c = cluster
    system = await tokens(c, text(1, 50))
    a = system + await tokens(c, text(2, 16))
    a = a[: full_blocks(len(a))]  # a whole number of blocks: the cap shows on a re-send
    b = system + await tokens(c, text(3, 4))
    other = await tokens(c, text(4, 50))
    assert common(a, other) < BS
    for engine, ids in (("e1", a), ("e2", b), ("e3", other)):
        assert await send(c, engine, ids) == 0  # cold caches

    follow_up = a + await tokens(c, text(5, 12))
    scores = await lookup(c, follow_up)
    assert scores == [("e1", len(a)), ("e2", full_blocks(min(common(follow_up, b), len(b))))]
    matched, cached = await check_on(c, "e1", follow_up)
    assert cached == matched == len(a)

    # the follow-up itself is now cached on e1; the next turn extends it
    second = follow_up + await tokens(c, text(6, 12))
    assert (await lookup(c, second))[0] == ("e1", full_blocks(len(follow_up)))
    await check_on(c, "e1", second)

    # the exact prompt again: the index matches every block, the engine recomputes the last
    assert (await lookup(c, a))[0] == ("e1", len(a))
    assert await send(c, "e1", a) == len(a) - BS

    # the shorter holder answers exactly too
    third = b + await tokens(c, text(7, 8))
    assert (await lookup(c, third))[0][0] == "e2"
    await check_on(c, "e2", third)
    # a replica the index does not list holds nothing of it
    await check_on(c, "e3", third)


async def test_eviction_reaches_the_index(cluster: demo.Cluster) -> None:
    c = cluster
    a = (await tokens(c, text(10, 60)))[: 10 * BS]
    flood = (await tokens(c, text(11, 200)))[: 40 * BS]
    assert len(a) == 10 * BS and len(flood) == 40 * BS
    assert common(a, flood) < BS
    await send(c, "e1", a)
    assert (await lookup(c, a))[0] == ("e1", len(a))

    await send(c, "e1", flood)  # 37 fresh blocks + 3 of a's (freed tail first)
    follow_up = a + await tokens(c, text(12, 8))
    matched, cached = await check_on(c, "e1", follow_up)
    assert 0 < cached == matched < len(a)
    worker = next(w for w in c.server.workers if w.replica_id == c.address("e1"))
    assert worker.counters.events["BlockRemoved"] > 0


async def test_reset_prefix_cache_reaches_the_index(cluster: demo.Cluster) -> None:
    c = cluster
    a = await tokens(c, text(20, 60))
    await send(c, "e1", a)
    await send(c, "e2", a)
    follow_up = a + await tokens(c, text(21, 8))
    assert sorted(await lookup(c, follow_up)) == [("e1", full_blocks(len(a))), ("e2", full_blocks(len(a)))]

    await c.post("e1", "/reset_prefix_cache", None)
    assert await lookup(c, follow_up) == [("e2", full_blocks(len(a)))]
    assert await check_on(c, "e1", follow_up) == (0, 0)
    matched, cached = await check_on(c, "e2", follow_up)
    assert cached == matched == full_blocks(len(a))
