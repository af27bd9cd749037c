"""Decoding every released wire format: the byte-exact vLLM samples in
``shared/data/kv-events`` (one test each, plus every frame of the real 0.33 publisher
capture), SGLang 0.5.23 fixtures, replay frame shapes, and malformed input."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
import vllm_samples

from inference_cache.index.kvevents import decode
from inference_cache.index.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored

from .conftest import DATA, batch, sglang_removed, sglang_stored

TOKENS = tuple(range(1, 33))
SAMPLE_STORED = BlockStored((1234567890123456789, 42), None, TOKENS, 16)


def _sample(version: str) -> bytes:
    return (DATA / f"vllm{version}_batch.msgpack").read_bytes()


@pytest.mark.parametrize(
    ("version", "stored", "removed", "rank"),
    [
        pytest.param("0.9.0", SAMPLE_STORED, BlockRemoved((42,)), None, id="0.9.0-array-2-field-batch"),
        pytest.param(
            "0.10.2",
            BlockStored((1234567890123456789, 42), None, TOKENS, 16, medium="GPU"),
            BlockRemoved((42,), "GPU"),
            0,
            id="0.10.2-array",
        ),
        *[
            pytest.param(
                v,
                BlockStored(
                    (1234567890123456789, 42),
                    None,
                    TOKENS,
                    16,
                    medium="GPU",
                    extra_keys=(None, None),
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                ),
                BlockRemoved((42,), "GPU", 0),
                0,
                id=f"{v}-{form}",
            )
            for v, form in (("0.23.0", "array"), ("0.24.0", "map"), ("0.33.0", "map16"))
        ],
    ],
)
def test_sample_batches(version: str, stored: BlockStored, removed: BlockRemoved, rank: int | None) -> None:
    got = decode.decode_batch(_sample(version))
    assert got == decode.EventBatch(1700000000.5, (stored, removed, AllBlocksCleared()), rank)


B0, B1 = 8866452693264111234, 807986237951177663
CAPTURE_EXPECTED = [
    decode.EventBatch(1700000000.0, (BlockStored((B0, B1), None, TOKENS, 16, medium="GPU"),), 0),
    decode.EventBatch(
        1700000001.0, (BlockStored((B1,), B0, tuple(range(17, 33)), 16, medium="GPU", group_idx=0),), 0
    ),
    # raw 32-byte digest: the low 64 bits of it are the int the engine publishes by default
    decode.EventBatch(1700000002.0, (BlockStored((B0,), None, tuple(range(1, 17)), 16, medium="GPU"),), 0),
    decode.EventBatch(1700000003.0, (BlockRemoved((B1,), "GPU", 0),), 0),
    decode.EventBatch(1700000004.0, (AllBlocksCleared(),), 0),
    decode.EventBatch(
        1700000005.0,
        (
            BlockRemoved((B0,), "GPU"),
            BlockStored((B0,), None, tuple(range(1, 17)), 16, medium="GPU"),
            AllBlocksCleared(),
        ),
        1,
    ),
    decode.EventBatch(
        1700000000.0,
        (
            BlockStored((B0, B1), None, TOKENS, 16, medium="GPU"),
            BlockRemoved((B1,), "GPU"),
            AllBlocksCleared(),
        ),
        0,
    ),
]


@pytest.mark.parametrize("index", range(len(CAPTURE_EXPECTED)))
def test_real_publisher_capture(index: int) -> None:
    captured = vllm_samples.capture()
    assert len(captured) == len(CAPTURE_EXPECTED)
    frame = captured[index]
    payload, seq, topic = frame.payload, frame.seq, frame.topic
    if seq is not None:
        msg = decode.split_live([topic, seq, payload])
        assert msg.seq == index
        assert topic == b"kv@fake@model"
        payload = msg.payload
    assert decode.decode_batch(payload) == CAPTURE_EXPECTED[index]


def test_bytes_and_int_hashes_are_one_identity() -> None:
    digest = bytes.fromhex("cd7c51bc5a8fc8643f383a2b9e01522fba7473c669e9270c7b0bf7bf7fd01682")
    assert decode.normalize_hash(digest) == decode.normalize_hash(B0) == B0
    # SGLang publishes signed int64: the same 64 bits as an unsigned value
    assert decode.normalize_hash(-1) == 2**64 - 1


def test_sglang_0_5_23_map_events() -> None:
    payload = batch(
        [
            sglang_stored([-5, 7], None, [11, 12], cache_salt="s", lora_name="ad", medium="GPU"),
            sglang_removed([7], medium="CPU_PINNED"),
            {"type": "AllBlocksCleared"},
        ],
        rank=3,
    )
    got = decode.decode_batch(payload, engine="sglang")
    assert got.rank == 3
    assert got.events == (
        BlockStored((2**64 - 5, 7), None, (11, 12), 1, medium="GPU", lora_name="ad", cache_salt="s"),
        BlockRemoved((7,), "CPU_PINNED"),
        AllBlocksCleared(),
    )


def test_sglang_array_form_decodes_by_its_own_field_order() -> None:
    ev = ["BlockStored", [1], None, [5], 1, None, "GPU", "salt", "sess", "ad"]
    got = decode.decode_batch(msgpack.packb([1.0, [ev], 0]), engine="sglang")
    assert got.events == (BlockStored((1,), None, (5,), 1, medium="GPU", lora_name="ad", cache_salt="salt"),)
    # the same array read as vLLM: field 7 is lora_name, field 8 extra_keys (not an array) -> error
    with pytest.raises(decode.EventDecodeError):
        decode.decode_batch(msgpack.packb([1.0, [ev], 0]))


def test_unknown_keys_trailing_elements_and_tags_are_tolerated() -> None:
    payload = msgpack.packb(
        [
            2.0,
            [
                {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "future_field": {"x": 1}},
                ["BlockRemoved", [2], "GPU", 0, "LOCAL", "tier", "beyond-0.33"],
                {"type": "BlockPinned", "block_hashes": [3]},
            ],
            0,
            b"publisher-id",
        ]
    )
    got = decode.decode_batch(payload)
    assert got.events == (
        BlockRemoved((1,), "GPU"),
        BlockRemoved((2,), "GPU", 0),
        decode.UnknownEvent("BlockPinned"),
    )


def test_extra_keys_become_tuples() -> None:
    ev = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1],
        "block_size": 1,
        "extra_keys": [["salt", ["img", 0]]],
    }
    (stored,) = decode.decode_batch(msgpack.packb([1.0, [ev]])).events
    assert isinstance(stored, BlockStored)
    assert stored.extra_keys == (("salt", ("img", 0)),)


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        pytest.param(_sample("0.33.0")[:-20], "msgpack", id="truncated"),
        pytest.param(_sample("0.33.0") + b"\x00", "msgpack", id="trailing-bytes"),
        pytest.param(b"\xc1", "msgpack", id="reserved-byte"),
        pytest.param(msgpack.packb({"ts": 1}), "batch", id="batch-not-array"),
        pytest.param(msgpack.packb([1.0]), "batch", id="batch-too-short"),
        pytest.param(msgpack.packb(["x", []]), "batch", id="ts-not-number"),
        pytest.param(msgpack.packb([1.0, {}]), "batch", id="events-not-array"),
        pytest.param(msgpack.packb([1.0, [], "zero"]), "batch", id="rank-not-int"),
        pytest.param(msgpack.packb([1.0, [[]]]), "event", id="empty-event"),
        pytest.param(msgpack.packb([1.0, [[7, 1]]]), "event", id="tag-not-string"),
        pytest.param(msgpack.packb([1.0, [{"type": "BlockRemoved"}]]), "event", id="removed-no-hashes"),
        pytest.param(msgpack.packb([1.0, [["BlockStored", [1], None]]]), "event", id="stored-too-short"),
        pytest.param(msgpack.packb([1.0, [["BlockRemoved", [None]]]]), "event", id="null-hash"),
        pytest.param(msgpack.packb([1.0, [["BlockRemoved", "abc"]]]), "event", id="hashes-not-array"),
        pytest.param(
            msgpack.packb([1.0, [["BlockStored", [1], None, ["a"], 1]]]), "event", id="tokens-not-ints"
        ),
        pytest.param(
            msgpack.packb([1.0, [["BlockStored", [1], None, [1, True], 2]]]), "event", id="tokens-bool"
        ),
        pytest.param(
            msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2.0], 2]]]), "event", id="tokens-float"
        ),
        pytest.param(msgpack.packb([1.0, [["BlockStored", [1], None, [1], 0]]]), "event", id="block-size-0"),
        pytest.param(
            msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1, None, 5]]]), "event", id="medium-int"
        ),
        pytest.param(msgpack.packb([1.0, [["BlockRemoved", [True]]]]), "event", id="bool-hash"),
    ],
)
def test_malformed_raises_one_typed_error(payload: bytes, kind: str) -> None:
    with pytest.raises(decode.EventDecodeError) as info:
        decode.decode_batch(payload)
    assert info.value.kind == kind


def test_msgpack_errors_are_chained() -> None:
    with pytest.raises(decode.EventDecodeError) as info:
        decode.decode_batch(b"\x93\xcb")
    assert isinstance(info.value.__cause__, ValueError)


END = (-1).to_bytes(8, "big", signed=True)


@pytest.mark.parametrize(
    ("frames", "want"),
    [
        pytest.param([b"", (5).to_bytes(8, "big"), b"p"], decode.Message(5, b"p"), id="2-frame"),
        pytest.param([b"", b"t", (5).to_bytes(8, "big"), b"p"], decode.Message(5, b"p"), id="3-frame"),
        pytest.param([b"", END, b""], None, id="2-frame-end"),
        pytest.param([b"", b"", END, b""], None, id="3-frame-end"),
    ],
)
def test_split_replay(frames: list[bytes], want: decode.Message | None) -> None:
    assert decode.split_replay(frames) == want


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([b"x", (5).to_bytes(8, "big"), b"p"], id="no-delimiter"),
        pytest.param([b"", b"\x01", b"p"], id="short-seq"),
        pytest.param([b"", (-2).to_bytes(8, "big", signed=True), b"p"], id="negative"),
        pytest.param([b""], id="one-frame"),
    ],
)
def test_split_replay_malformed(frames: list[bytes]) -> None:
    with pytest.raises(decode.EventDecodeError):
        decode.split_replay(frames)


def test_split_live() -> None:
    assert decode.split_live([b"t", (2**64 - 1).to_bytes(8, "big"), b"p"]) == decode.Message(2**64 - 1, b"p")
    with pytest.raises(decode.EventDecodeError):
        decode.split_live([b"t", b"p"])
    with pytest.raises(decode.EventDecodeError):
        decode.split_live([b"t", b"1234", b"p"])


def test_every_sample_file_is_covered() -> None:
    tested = {"0.9.0", "0.10.2", "0.23.0", "0.24.0", "0.33.0"}
    on_disk = {re.sub(r"^vllm|_batch\.msgpack$", "", p.name) for p in Path(DATA).glob("*.msgpack")}
    assert on_disk == tested
