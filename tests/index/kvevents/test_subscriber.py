"""The asyncio subscriber over REAL ZMQ sockets (tcp on 127.0.0.1 with OS-chosen ports,
or ipc in tmp_path) against ``FakePublisher`` (vLLM's publisher protocol). Waits are
bounded polls on the recording sink or the counters, never fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from inference_cache.index import fingerprint as fp
from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.index.kvevents.subscriber import Subscriber, SubscriberSettings
from inference_cache.index.types import Scope

from .conftest import (
    CLEARED,
    FakePublisher,
    RecordingSink,
    batch,
    sglang_removed,
    sglang_stored,
    until,
    vllm_removed,
    vllm_stored,
)

T64 = list(range(1, 65))
KEYS = fp.chain_keys(T64, 16)
LOCAL = "tcp://127.0.0.1:0"


def _block(i: int, *, parent: bool = True, **kw: Any) -> dict[str, Any]:
    """vLLM BlockStored of block ``i`` of T64 (engine hash 100 + i)."""
    return vllm_stored([100 + i], (99 + i) if parent and i else None, T64[16 * i : 16 * (i + 1)], **kw)


def _config(pub: FakePublisher, **kw: Any) -> EndpointConfig:
    return EndpointConfig(
        replica_id="r1",
        model="m1",
        kv_events=pub.endpoint,
        replay=pub.replay_endpoint,
        topic="kv-events",
        **kw,
    )


@contextlib.asynccontextmanager
async def running(sub: Subscriber) -> AsyncIterator[Subscriber]:
    task = asyncio.create_task(sub.run())
    try:
        yield sub
    finally:
        sub.stop()
        await asyncio.wait_for(task, 5.0)


@contextlib.asynccontextmanager
async def publisher(
    ctx: zmq.asyncio.Context, endpoint: str = LOCAL, **kw: Any
) -> AsyncIterator[FakePublisher]:
    pub = FakePublisher(ctx, endpoint, **kw)
    try:
        yield pub
    finally:
        await pub.close()


async def test_live_ingest_syncs_from_replay_then_streams(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await pub.publish(batch([_block(1)], ts=7.0))
            await until(lambda: len(sink.stored()) == 2)
        assert sink.keys() == set(KEYS[:2])
        assert sink.stored()[1] == ("stored", Scope("", "m1", "vllm"), "r1", [KEYS[1]], [32], 7.0)
        assert pub.replay_requests == [0]  # the first message asks for the oldest buffered batch
        assert sub.counters.batches == 2
        assert sub.counters.events == {"BlockStored": 2}


async def test_first_message_replays_what_was_published_before_we_joined(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        await pub.publish(batch([_block(0)]), send=False)  # before any subscriber
        await pub.publish(batch([_block(1)]), send=False)
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(2)]))
            await until(lambda: len(sink.keys()) == 3)
        assert [c[3] for c in sink.stored()] == [[k] for k in KEYS[:3]]
        # Replay was asked for on connect; it may or may not already hold seq 2 (then the
        # live copy is the duplicate): either way each batch applied exactly once.
        assert sub.counters.replayed_batches - sub.counters.duplicates == 2
        assert sub.counters.batches == 3
        assert sub.counters.resyncs == 0


async def test_connecting_replays_even_when_the_engine_stays_idle(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        await pub.publish(batch([_block(0)]), send=False)  # before any subscriber
        await pub.publish(batch([_block(1)]), send=False)
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await until(lambda: len(sink.keys()) == 2)  # no live batch is ever sent
        assert pub.replay_requests == [0]
        assert sink.keys() == set(KEYS[:2])


@pytest.mark.parametrize("frames", [2, 3], ids=["vllm<=0.25", "vllm>=0.26"])
async def test_gap_is_filled_by_replay(zctx: zmq.asyncio.Context, sink: RecordingSink, frames: int) -> None:
    async with publisher(zctx, replay=LOCAL, replay_frames=frames) as pub:
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await until(lambda: len(sink.keys()) == 1)
            await pub.publish(batch([_block(1)]), send=False)  # dropped on the wire
            await pub.publish(batch([_block(2)]), send=False)
            await pub.publish(batch([_block(3)]))
            await until(lambda: len(sink.keys()) == 4)
        assert sink.keys() == set(KEYS)
        assert pub.replay_requests == [0, 1]
        assert sub.counters.gaps == 1
        assert sub.counters.resyncs == 0
        assert sub.counters.orphan_blocks == 0


async def test_gap_without_replay_endpoint_resyncs(zctx: zmq.asyncio.Context, sink: RecordingSink) -> None:
    async with publisher(zctx) as pub:
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await until(lambda: len(sink.keys()) == 1)
            await pub.publish(batch([_block(1)]), send=False)
            await pub.publish(batch([_block(2)]))  # its parent was lost: orphan after the resync
            await pub.publish(batch([_block(0, group_idx=0)]))  # block 0 stored again rebuilds
            await until(lambda: sub.counters.batches == 3)
        assert sub.counters.gaps == 1
        assert sub.counters.resyncs == 1
        assert ("cleared", "r1", "m1", "") in sink.calls
        assert sub.counters.orphan_blocks == 1
        assert sink.keys() == {KEYS[0]}


async def test_replay_that_cannot_cover_the_gap_resyncs(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    async with publisher(zctx, replay=LOCAL, buffer_steps=1) as pub:
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await until(lambda: len(sink.keys()) == 1)
            await pub.publish(batch([_block(1)]), send=False)  # gone from the 1-batch buffer
            await pub.publish(batch([_block(2)]))
            await until(lambda: sub.counters.resyncs == 1)
            await until(lambda: sub.counters.batches == 2)
        assert pub.replay_requests == [0, 1]
        assert sink.keys() == set()  # state dropped; block 2's parent is unknown
        assert sub.counters.orphan_blocks == 1


async def test_replay_timeout_resyncs(zctx: zmq.asyncio.Context, sink: RecordingSink) -> None:
    silent = zctx.socket(zmq.ROUTER)  # a replay endpoint that never answers
    silent.bind(LOCAL)
    try:
        async with publisher(zctx) as pub:
            cfg = _config(pub)
            cfg = EndpointConfig(
                cfg.replica_id,
                cfg.model,
                cfg.kv_events,
                replay=silent.getsockopt_string(zmq.LAST_ENDPOINT),
                topic=cfg.topic,
            )
            sub = Subscriber(cfg, sink, settings=SubscriberSettings(replay_timeout_s=0.05))
            async with running(sub):
                await pub.wait_subscribed()
                await pub.publish(batch([_block(0)]))  # initial sync times out: applied anyway
                await until(lambda: len(sink.keys()) == 1)
                await pub.publish(batch([_block(1)]), send=False)
                await pub.publish(batch([_block(2)]))
                await until(lambda: sub.counters.resyncs == 1)
        # On connect (timed out, no state), at the first message, for the gap.
        assert sub.counters.replays_requested == 3
    finally:
        silent.close(linger=0)


async def test_engine_restart_drops_state_and_rebuilds(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await pub.publish(batch([_block(1)]))
            await pub.publish(batch([_block(2)]))
            await until(lambda: len(sink.keys()) == 3)
            pub.restart()
            await pub.publish(batch([_block(0, parent=False)]))  # seq 0 again
            await until(lambda: sub.counters.restarts == 1)
            await until(lambda: sink.keys() == {KEYS[0]})
        assert ("cleared", "r1", "m1", "") in sink.calls
        assert pub.replay_requests == [0, 0]


async def test_bad_batches_are_counted_and_skipped(zctx: zmq.asyncio.Context, sink: RecordingSink) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        sub = Subscriber(_config(pub), sink)
        async with running(sub):
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await pub.publish(batch([_block(1)])[:-9])  # truncated msgpack
            await pub.publish(msgpack.packb(["ts", [], 0]))  # wrong types
            await pub.publish(batch([{"type": "BlockStored", "block_hashes": "x"}]))
            await pub.pub.send_multipart([b"kv-events", b"\x01", b""])  # bad sequence frame
            await pub.publish(batch([_block(1), vllm_stored([500], 12345, T64[:16])]))  # good + orphan
            await until(lambda: len(sink.keys()) == 2)
        assert sub.counters.decode_errors == {"msgpack": 1, "batch": 1, "event": 1, "framing": 1}
        assert sub.counters.orphan_blocks == 1
        assert sub.counters.gaps == 0  # skipped batches still advance the sequence


async def test_bind_mode_engine_connects(
    zctx: zmq.asyncio.Context, sink: RecordingSink, tmp_path: Path
) -> None:
    endpoint = f"ipc://{tmp_path}/kv.sock"
    sub = Subscriber(EndpointConfig("r1", "m1", endpoint, kv_events_bind=True, topic="kv-events"), sink)
    async with running(sub):
        await until(lambda: (tmp_path / "kv.sock").exists())
        async with publisher(zctx, endpoint, connect=True) as pub:
            await pub.wait_subscribed()
            await pub.publish(batch([_block(0)]))
            await until(lambda: len(sink.keys()) == 1)


async def _bind_consecutive(ctx: zmq.asyncio.Context) -> tuple[FakePublisher, FakePublisher]:
    """Two publishers on ports p and p + 1 (vLLM's data-parallel port offset)."""
    for _ in range(20):
        first = FakePublisher(ctx, LOCAL)
        port = int(first.endpoint.rsplit(":", 1)[1])
        try:
            return first, FakePublisher(ctx, f"tcp://127.0.0.1:{port + 1}")
        except zmq.ZMQError:
            await first.close()
    raise AssertionError("no two consecutive free ports")


async def test_two_ranks_feed_one_replica_with_refcounted_keys(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    rank0, rank1 = await _bind_consecutive(zctx)
    try:
        cfg = EndpointConfig("r1", "m1", rank0.endpoint, topic="kv-events", data_parallel_size=2)
        sub = Subscriber(cfg, sink)
        async with running(sub):
            await rank0.wait_subscribed()
            await rank1.wait_subscribed()
            await rank0.publish(batch([_block(0)], rank=0))
            await rank1.publish(batch([vllm_stored([900], None, T64[:16])], rank=1))
            await until(lambda: sub.counters.batches == 2)
            assert sink.keys() == {KEYS[0]}
            await rank0.publish(batch([vllm_removed([100])], rank=0))
            await until(lambda: sub.counters.events["BlockRemoved"] == 1)
            assert sink.keys() == {KEYS[0]}  # rank 1 still holds it
            await rank1.publish(batch([CLEARED], rank=1))
            await until(lambda: sink.keys() == set())
        assert ("cleared", "r1", "m1", "") in sink.calls
    finally:
        await rank0.close()
        await rank1.close()


async def test_sglang_pages_salt_and_lora_over_the_wire(
    zctx: zmq.asyncio.Context, sink: RecordingSink
) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        sub = Subscriber(_config(pub, engine="sglang", block_size=2), sink)
        async with running(sub):
            await pub.wait_subscribed()
            parent = None
            for i, tok in enumerate([5, 6, 7, 8, 9]):
                ev = sglang_stored([-(i + 1)], parent, [tok], cache_salt="s", lora_name="ad")
                await pub.publish(batch([ev], rank=0))
                parent = -(i + 1)
            await until(lambda: len(sink.keys()) == 2)
            await pub.publish(batch([sglang_removed([-3])]))  # page of block 2 -> block 2 goes
            await until(lambda: len(sink.keys()) == 1)
        assert sink.keys() == {fp.chain_keys([5, 6], 2, salt="s")[0]}
        assert {c[1].adapter for c in sink.stored()} == {"ad"}


async def test_filters_and_adapters_over_the_wire(zctx: zmq.asyncio.Context, sink: RecordingSink) -> None:
    async with publisher(zctx, replay=LOCAL) as pub:
        sub = Subscriber(_config(pub, lora_names={7: "mapped"}), sink)
        async with running(sub):
            await pub.wait_subscribed()
            events = [
                vllm_stored([1], None, T64[:16], medium="CPU"),
                vllm_stored([2], None, T64[:16], kv_cache_spec_kind="sliding_window", group_idx=1),
                vllm_stored([3], None, T64[:16], lora_id=7),
                vllm_stored([4], None, T64[:16], lora_name="ad", extra_keys=[["ad", "salty"]]),
            ]
            await pub.publish(batch(events))
            await until(lambda: len(sink.stored()) == 2)
        mapped, salted = sink.stored()
        assert mapped[1].adapter == "mapped" and mapped[3] == [KEYS[0]]
        assert salted[1].adapter == "ad" and salted[3] == fp.chain_keys(T64[:16], 16, salt="salty")
        assert sub.counters.skipped_blocks == {"medium": 1, "kv_cache_spec_kind": 1}


async def test_socket_error_reconnects_with_backoff(zctx: zmq.asyncio.Context, sink: RecordingSink) -> None:
    blocker = zctx.socket(zmq.PUB)  # holds the address the subscriber wants to bind
    blocker.bind(LOCAL)
    endpoint = blocker.getsockopt_string(zmq.LAST_ENDPOINT)
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 3:
            blocker.close(linger=0)  # the address frees up (asynchronously): a later bind succeeds
        await asyncio.sleep(0)

    settings = SubscriberSettings(backoff_initial_s=1.0, backoff_max_s=1.5)
    cfg = EndpointConfig("r1", "m1", endpoint, kv_events_bind=True)
    sub = Subscriber(cfg, sink, settings=settings, sleep=fake_sleep)
    try:
        async with running(sub):
            await until(lambda: len(delays) >= 3)
            async with publisher(zctx, endpoint, connect=True, topic="") as pub:
                await pub.wait_subscribed()
                await pub.publish(batch([_block(0)]))
                await until(lambda: len(sink.keys()) == 1)
    finally:
        blocker.close(linger=0)
    assert delays[:3] == [1.0, 1.5, 1.5]  # doubling, capped
    assert sub.counters.reconnects == len(delays)
