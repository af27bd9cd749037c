"""KV event bytes: the same logical batch as each shared/data/kv-events/vllm<ver>_batch.txt
encodes to the very bytes of the matching .msgpack, and the frames of the real vLLM 0.33.0
publisher capture are reproduced byte for byte over real ZMQ."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import vllm_samples
import zmq

from inference_cache.fakeengine import events, hashing, publisher, versions
from inference_cache.fakeengine.events import AllBlocksCleared, BlockRemoved, BlockStored

SAMPLE_VERSIONS = ["0.9.0", "0.10.2", "0.23.0", "0.24.0", "0.33.0"]


def sample_batch() -> list[events.Event]:
    """The batch every vllm<ver>_batch.txt describes (fields a version lacks are dropped)."""
    return [
        BlockStored(
            [1234567890123456789, 42],
            None,
            list(range(1, 33)),
            16,
            extra_keys=[None, None],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        ),
        BlockRemoved([42], group_idx=0),
        AllBlocksCleared(),
    ]


@pytest.mark.parametrize("version", SAMPLE_VERSIONS)
def test_batch_bytes_match_vllm(kv_events_dir: Path, version: str) -> None:
    expected = (kv_events_dir / f"vllm{version}_batch.msgpack").read_bytes()
    described = (kv_events_dir / f"vllm{version}_batch.txt").read_text()
    assert expected.hex() in described
    assert events.encode_batch(versions.parse(version), 1700000000.5, sample_batch(), 0) == expected


def test_map_header_follows_the_class_size() -> None:
    stored = BlockStored([1], None, list(range(16)), 16)
    assert events.encode_event(stored, (0, 33, 0))[:3] == b"\xde\x00\x08"  # 16 possible keys: map16
    assert events.encode_event(stored, (0, 24, 0))[:1] == b"\x88"  # 12 possible keys: fixmap
    assert events.encode_event(BlockRemoved([1]), (0, 33, 0))[:1] == b"\x83"


H0 = hashing.external(bytes.fromhex("cd7c51bc5a8fc8643f383a2b9e01522fba7473c669e9270c7b0bf7bf7fd01682"))
H1 = hashing.external(bytes.fromhex("2533ea50426b36e9e4d68296cac6bce8cf602e46957d0fe40b368b33d87bf3bf"))
RAW0 = bytes.fromhex("cd7c51bc5a8fc8643f383a2b9e01522fba7473c669e9270c7b0bf7bf7fd01682")
CAPTURED_BATCHES: list[tuple[float, list[events.Event], int]] = [
    (1700000000.0, [BlockStored([H0, H1], None, list(range(1, 33)), 16)], 0),
    (1700000001.0, [BlockStored([H1], H0, list(range(17, 33)), 16, group_idx=0)], 0),
    (1700000002.0, [BlockStored([RAW0], None, list(range(1, 17)), 16)], 0),
    (1700000003.0, [BlockRemoved([H1], group_idx=0)], 0),
    (1700000004.0, [AllBlocksCleared()], 0),
    (
        1700000005.0,
        [BlockRemoved([H0]), BlockStored([H0], None, list(range(1, 17)), 16), AllBlocksCleared()],
        1,
    ),
]


def test_capture_hashes_are_ours() -> None:
    hasher = hashing.BlockHasher.create("sha256_cbor", None, 16, (0, 33, 0))
    assert [hashing.external(h) for h in hasher.extend([], list(range(1, 33)))] == [H0, H1]


async def test_real_publisher_capture_reproduced(kv_events_dir: Path, tmp_path: Path) -> None:
    expected = [(f.topic, f.seq, f.payload) for f in vllm_samples.capture() if not f.reconstructed]
    assert len(expected) == len(CAPTURED_BATCHES) == 6
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = publisher.ZmqPublisher(
        publisher.PublisherSettings(endpoint=f"ipc://{tmp_path}/pub", topic="kv@fake@model"), context=ctx
    )
    await pub.start()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@fake@model")
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        sub.connect(pub.endpoint)
        await _until_subscribed(pub, sub)
        for ts, batch, rank in CAPTURED_BATCHES:
            pub.publish(events.encode_batch((0, 33, 0), ts, batch, rank))
        got = [tuple(sub.recv_multipart()) for _ in expected]
    finally:
        sub.close(linger=0)
        await pub.close()
        ctx.term()
    assert got == expected


async def _until_subscribed(pub: publisher.ZmqPublisher, sub: zmq.Socket[bytes]) -> None:
    """PUB drops messages until the subscription arrives: probe with throwaway batches on a
    fresh publisher, then restart its sequence (the probes never reach the assertions)."""
    sub.setsockopt(zmq.RCVTIMEO, 20)
    for _ in range(250):
        pub.publish(b"probe")
        try:
            sub.recv_multipart()
            break
        except zmq.Again:
            continue
    else:
        pytest.fail("subscription never arrived")
    while True:
        try:
            sub.recv_multipart()
        except zmq.Again:
            break
    pub.restart()
    sub.setsockopt(zmq.RCVTIMEO, 5000)


def test_pre_024_capture_is_the_array_form(kv_events_dir: Path) -> None:
    (expected,) = [f.payload for f in vllm_samples.capture() if f.reconstructed]
    batch = [
        BlockStored([H0, H1], None, list(range(1, 33)), 16),
        BlockRemoved([H1]),
        AllBlocksCleared(),
    ]
    assert events.encode_batch((0, 20, 0), 1700000000.0, batch, 0) == expected
    assert msgpack.unpackb(expected)[1][2] == ["AllBlocksCleared"]
