"""The ZMQ publisher over real sockets: vLLM's bind/connect rule and rank offsets, the PUB
frames, replay framing per version (2 frames up to 0.25, 3 from 0.26, -1 end marker), the
drop (sequence gap) and restart fault switches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from inference_cache.fakeengine import publisher
from inference_cache.fakeengine.publisher import PublisherSettings, ZmqPublisher


@pytest.mark.parametrize(
    ("endpoint", "binds"),
    [
        ("tcp://*:5557", True),
        ("tcp://[::]:5557", True),
        ("ipc:///tmp/x", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://10.0.0.1:5557", False),
    ],
)
def test_bind_rule(endpoint: str, binds: bool) -> None:
    assert publisher.binds(endpoint) is binds


def test_rank_offset() -> None:
    assert publisher.offset_endpoint("tcp://*:5557", 1) == "tcp://*:5558"
    assert publisher.offset_endpoint("inproc://kv", 2) == "inproc://kv_dp2"
    assert publisher.offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"


Ctx = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def ctx() -> Iterator[zmq.asyncio.Context]:
    """Test sockets are asyncio ones over the same context the publisher gets."""
    context: Ctx = zmq.Context()
    yield zmq.asyncio.Context.shadow(context.underlying)
    context.term()


def sync(ctx: zmq.asyncio.Context) -> Ctx:
    return zmq.Context.shadow(ctx.underlying)


async def started(tmp_path: Path, ctx: zmq.asyncio.Context, version: tuple[int, int, int]) -> ZmqPublisher:
    pub = ZmqPublisher(
        PublisherSettings(
            endpoint=f"ipc://{tmp_path}/pub",
            replay_endpoint="tcp://127.0.0.1:0",
            topic="kv",
            buffer_steps=3,
            version=version,
        ),
        context=sync(ctx),
    )
    await pub.start()
    return pub


async def replay(ctx: zmq.asyncio.Context, endpoint: str, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert frames[0] == b""
            out.append(frames[1:])
            if frames[-2] == publisher.END_SEQ:
                return out
    finally:
        dealer.close(linger=0)


@pytest.mark.parametrize(
    ("version", "three"), [((0, 25, 0), False), ((0, 26, 0), True), ((0, 33, 0), True), ((0, 10, 2), False)]
)
async def test_replay_framing(
    tmp_path: Path, ctx: zmq.asyncio.Context, version: tuple[int, int, int], three: bool
) -> None:
    pub = await started(tmp_path, ctx, version)
    try:
        for i in range(5):
            assert pub.publish(b"batch%d" % i) == i
        assert pub.replay_endpoint is not None and not pub.replay_endpoint.endswith(":0")
        got = await replay(ctx, pub.replay_endpoint, 1)
    finally:
        await pub.close()
    seq = [i.to_bytes(8, "big") for i in range(5)]
    if three:
        # buffer_steps=3: batch 1 is gone, the first replayed seq (2) tells the client
        assert got == [[b"kv", seq[2], b"batch2"], [b"kv", seq[3], b"batch3"], [b"kv", seq[4], b"batch4"],
                       [b"", b"\xff" * 8, b""]]  # fmt: skip
    else:
        assert got == [[seq[2], b"batch2"], [seq[3], b"batch3"], [seq[4], b"batch4"], [b"\xff" * 8, b""]]


async def subscribed(ctx: zmq.asyncio.Context, pub: ZmqPublisher) -> zmq.asyncio.Socket:
    """A SUB socket that has provably joined (PUB drops until then): probe, then restart."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    for _ in range(250):
        pub.publish(b"probe")
        if await sub.poll(20):
            break
    else:
        pytest.fail("subscription never arrived")
    while await sub.poll(20):
        await sub.recv_multipart()
    pub.restart()
    return sub


async def test_drop_makes_a_gap_that_replay_fills(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    pub = await started(tmp_path, ctx, (0, 33, 0))
    sub = await subscribed(ctx, pub)
    try:
        pub.publish(b"a")
        pub.drop_next(1)
        pub.publish(b"b")
        pub.publish(b"c")
        first = await asyncio.wait_for(sub.recv_multipart(), 5)
        second = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert first == [b"kv", (0).to_bytes(8, "big"), b"a"]
        assert second == [b"kv", (2).to_bytes(8, "big"), b"c"]
        assert pub.replay_endpoint is not None
        got = await replay(ctx, pub.replay_endpoint, 1)
        assert got[0] == [b"kv", (1).to_bytes(8, "big"), b"b"]
    finally:
        sub.close(linger=0)
        await pub.close()


async def test_restart_starts_over(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    pub = await started(tmp_path, ctx, (0, 33, 0))
    try:
        pub.publish(b"a")
        pub.publish(b"b")
        pub.restart()
        assert pub.publish(b"c") == 0
        assert pub.replay_frames(0) == [[b"kv", bytes(8), b"c"], [b"", publisher.END_SEQ, b""]]
    finally:
        await pub.close()


async def test_connecting_publisher(ctx: zmq.asyncio.Context) -> None:
    """A non-wildcard tcp endpoint connects to a subscriber that bound (vLLM's rule)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    pub = ZmqPublisher(PublisherSettings(endpoint=f"tcp://127.0.0.1:{port}"), context=sync(ctx))
    await pub.start()
    try:
        for _ in range(250):
            pub.publish(b"x")
            if await sub.poll(20):
                break
        frames = await sub.recv_multipart()
        assert frames[0] == b"" and frames[2] == b"x"
    finally:
        sub.close(linger=0)
        await pub.close()
