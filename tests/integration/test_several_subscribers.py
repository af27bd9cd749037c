"""Several servers subscribed to the same fake engines, and a server restarted while the
engines keep serving: every subscriber's index must equal the engines' cache state.

Two fake engines publish KV events over ``ipc://`` (one PUB socket, any number of SUB
sockets) with a replay endpoint. A second :class:`~inference_cache.extproc.serve.Server` is
built from the first one's config (listeners on port 0) and shares the engines, the HTTP
session and the :class:`~inference_cache.demo.Cluster` helpers. Checks, after every server
applied every batch the engines published (``Cluster.wait_ingested``):

* the servers' ``LookupRoute`` answers are identical (replica order and ``matched_tokens``);
* every engine's ``cached_tokens`` for the follow-up equals the index's ``matched_tokens``
  for it, capped as an engine caps a hit (whole blocks, the last prompt token recomputed).

Policy floors are off so every holder is listed.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest

from inference_cache import demo
from inference_cache.extproc.serve import Server
from inference_cache.proto import pb_grpc

from .conftest import (
    SYNC_S,
    TINY_TOKENIZER,
    Scores,
    cap,
    floors_off,
    full_blocks,
    lookup,
    send,
    text,
    tokens,
)

SETTINGS = demo.DemoSettings(tokenizer=TINY_TOKENIZER, engines=2, num_gpu_blocks=400)


async def add_server(c: demo.Cluster, stack: contextlib.AsyncExitStack) -> demo.Cluster:
    """Another server on ``c``'s engines (same config: same endpoints, ports 0)."""
    server = Server(c.server.config)
    stack.push_async_callback(server.stop, 0.1)
    addresses = await server.start()
    floors_off(server, SETTINGS.tenant)
    channel = grpc.aio.insecure_channel(addresses.grpc)
    stack.push_async_callback(channel.close)
    return demo.Cluster(c.engines, server, c.session, pb_grpc.InferenceCacheStub(channel), c.block_size)


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as s:
        yield s


@pytest.fixture
async def cluster(stack: contextlib.AsyncExitStack) -> demo.Cluster:
    c = await demo.start_cluster(SETTINGS, stack)
    floors_off(c.server, SETTINGS.tenant)
    await c.connect(SYNC_S)
    return c


async def engines_agree(c: demo.Cluster, scores: Scores, ids: Sequence[int]) -> None:
    """Send ``ids`` to every engine: each one's hit is its ``matched_tokens`` in ``scores``
    (0 where unlisted), capped like an engine hit."""
    matched = dict(scores)
    for engine in c.engines:
        cached = await send(c, engine, ids)
        assert cached == min(matched.get(engine, 0), cap(ids)), (engine, scores, cached, len(ids))


async def catch_up(c: demo.Cluster, pokes: Iterator[int]) -> None:
    """A fresh subscriber syncs (replay from the oldest buffered batch) on its first live
    batch: give lagging engines a fresh prompt (a new block, one live batch; a reset would
    wipe the state under test) until ``c``'s server applied everything they published."""
    for _ in range(50):
        if not (lagging := c.lagging()):
            return
        for engine in lagging:
            await send(c, engine, await tokens(c, text(next(pokes), 40)))
        with contextlib.suppress(demo.DemoError):
            await c.wait_ingested(0.2)
    assert not c.lagging(), c.lagging()


async def test_two_servers_on_the_same_engines_answer_alike(
    cluster: demo.Cluster, stack: contextlib.AsyncExitStack
) -> None:
    c1 = cluster
    c2 = await add_server(c1, stack)
    await c2.connect(SYNC_S)  # its pings (empty AllBlocksCleared) reach c1 too
    system = await tokens(c1, text(1, 50))
    a = system + await tokens(c1, text(2, 16))
    b = system + await tokens(c1, text(3, 4))
    other = await tokens(c1, text(4, 50))
    for engine, ids in (("e1", a), ("e2", b), ("e1", other), ("e2", other)):
        assert await send(c1, engine, ids) == 0  # cold caches

    # a's follow-up: e1 holds all of a, e2 the system prompt (b's blocks); other: both, alike
    expected_best = {"a": ("e1", full_blocks(len(a))), "b": ("e2", full_blocks(len(b)))}
    for label, ids, seed in (("a", a, 5), ("b", b, 6), ("other", other, 7)):
        follow_up = ids + await tokens(c1, text(seed, 12))
        first, second = await lookup(c1, follow_up), await lookup(c2, follow_up)
        assert first == second
        assert {e for e, _ in first} == {"e1", "e2"}, first
        if label in expected_best:
            assert first[0] == expected_best[label], first
        else:
            assert first[0][1] == first[1][1] == full_blocks(len(other)), first
        await engines_agree(c1, first, follow_up)


async def test_a_restarted_server_rebuilds_the_index_from_replay(
    cluster: demo.Cluster, stack: contextlib.AsyncExitStack
) -> None:
    c = cluster
    pokes = itertools.count(1000)
    a = await tokens(c, text(10, 40))
    b = await tokens(c, text(11, 40))
    await send(c, "e1", a)
    await send(c, "e2", b)
    assert (await lookup(c, a))[0] == ("e1", full_blocks(len(a)))

    await c.server.stop(0.1)
    # while no server listens: a grows on e1, a new prompt lands on e2
    a2 = a + await tokens(c, text(12, 30))
    d = await tokens(c, text(13, 40))
    assert await send(c, "e1", a2) == full_blocks(len(a))
    assert await send(c, "e2", d) == 0

    restarted = await add_server(c, stack)
    assert set(restarted.lagging()) == {"e1", "e2"}  # a fresh index
    await catch_up(restarted, pokes)
    for worker in restarted.server.workers:
        assert worker.counters.replayed_batches > 0, worker.replica_id  # rebuilt by replay
    for running in c.engines.values():
        assert running.publisher is not None
        assert running.publisher.next_seq <= running.config.buffer_steps  # all still buffered

    for ids, seed, holder, held in ((a2, 14, "e1", len(a2)), (d, 15, "e2", len(d)), (b, 16, "e2", len(b))):
        follow_up = ids + await tokens(c, text(seed, 8))
        scores = await lookup(restarted, follow_up)
        assert scores[0] == (holder, full_blocks(held)), scores
        await engines_agree(restarted, scores, follow_up)
