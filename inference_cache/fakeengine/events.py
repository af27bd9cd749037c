"""KV events and their msgpack bytes, exactly as the emulated vLLM version encodes them.

Owner: ``inference_cache.fakeengine``; ``prefix_cache`` produces the events, ``publisher``
sends the bytes. vLLM encodes ``KVEventBatch`` with ``msgspec.msgpack`` (see
shared/research/protocols.md §1.4-1.5); this module reproduces those bytes with ``msgpack``:

* the batch is always a positional array ``[ts (float64), events, data_parallel_rank]``
  (no rank before 0.10);
* events are tagged arrays ``[tag, field...]`` with every field up to 0.23, and tagged maps
  ``{"type": tag, field: value...}`` from 0.24 in which fields that have a default are left
  out when ``None``;
* msgspec sizes a map header for the struct's possible keys: a map16 header whenever the
  event class has more than 15 keys (``de 0008`` for 8 present keys in 0.33), else a fixmap.

The dataclasses hold every field any version has; a version encodes only its own fields.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from inference_cache.fakeengine.versions import Version
from inference_cache.index.kvevents import vllm_schema

Hash = int | bytes
MEDIUM_GPU = "GPU"


@dataclass(frozen=True)
class BlockStored:
    block_hashes: Sequence[Hash]
    parent_block_hash: Hash | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: Sequence[Sequence[int]] | None = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: Sequence[Hash]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


_SCHEMAS: dict[type, tuple[vllm_schema.Field, ...]] = {
    BlockStored: vllm_schema.BLOCK_STORED,
    BlockRemoved: vllm_schema.BLOCK_REMOVED,
    AllBlocksCleared: vllm_schema.ALL_BLOCKS_CLEARED,
}

#: Events are maps from this version (vLLM PR #42892), arrays before.
MAP_EVENTS_SINCE: Version = (0, 24, 0)
#: The batch carries ``data_parallel_rank`` from this version.
DP_RANK_SINCE: Version = (0, 10, 0)

_pack: Callable[[object], bytes] = msgpack.Packer(
    use_bin_type=True, use_single_float=False, autoreset=True
).pack


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)


def _map_header(n: int, possible: int) -> bytes:
    return bytes([0x80 | n]) if possible < 16 else b"\xde" + struct.pack(">H", n)


def fields_of(event: Event, version: Version) -> list[tuple[str, bool]]:
    """``(name, has_default)`` of the event class's fields in the version, in order."""
    return [(f.name, f.has_default) for f in _SCHEMAS[type(event)] if f.since <= version]


def encode_event(event: Event, version: Version) -> bytes:
    tag = type(event).__name__
    fields = fields_of(event, version)
    if version < MAP_EVENTS_SINCE:
        out = [_array_header(1 + len(fields)), _pack(tag)]
        out += [_pack(getattr(event, name)) for name, _ in fields]
        return b"".join(out)
    present = [
        (n, getattr(event, n)) for n, has_default in fields if not (has_default and getattr(event, n) is None)
    ]
    out = [_map_header(1 + len(present), 1 + len(fields)), _pack("type"), _pack(tag)]
    for name, value in present:
        out += [_pack(name), _pack(value)]
    return b"".join(out)


def encode_batch(
    version: Version, ts: float, events: Sequence[Event], data_parallel_rank: int | None = 0
) -> bytes:
    """One ``KVEventBatch`` payload (the third ZMQ frame)."""
    head = [_pack(float(ts)), _array_header(len(events)), *(encode_event(e, version) for e in events)]
    if version < DP_RANK_SINCE:
        return _array_header(2) + b"".join(head)
    return _array_header(3) + b"".join(head) + _pack(data_parallel_rank)
