"""Engine KV-event wire format -> typed events.

Owner: ``inference_cache.index.kvevents``. Called by the ``subscriber`` on every ZMQ
message (live and replayed); its output feeds the ``mapper``. Pure functions, no I/O.

Formats (research ``protocols.md`` §1.2-1.5, §3):
- batch: always a positional array ``[ts, events, rank?]`` (vLLM ``data_parallel_rank``,
  SGLang ``attn_dp_rank``; vLLM 0.9 has no third element; extra elements are ignored);
- events: arrays ``[tag, field...]`` in declaration order (vLLM <= 0.23, old SGLang) or
  maps ``{"type": tag, field: value}`` with default-valued fields omitted (vLLM >= 0.24,
  SGLang 0.5.x). Maps are decoded by name, unknown keys and trailing array elements are
  ignored, unknown tags become ``UnknownEvent``;
- hashes: ints (vLLM u64, SGLang signed i64) or raw digests (bytes), all normalised to
  ``int.from_bytes(b, "big") & (2**64 - 1)`` like vLLM's own int conversion, so one block
  has one identity whichever form the engine published.

Every malformed input raises ``EventDecodeError`` (msgpack's errors translated here, once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from inference_cache.index.kvevents import vllm_schema
from inference_cache.index.kvevents.config import Engine

MASK64 = (1 << 64) - 1
#: Replay end marker: sequence -1 as 8 signed big-endian bytes.
END_SEQ = -1


class EventDecodeError(ValueError):
    """Undecodable engine input; ``kind`` groups errors for counting and logging."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


ExtraKeys: TypeAlias = tuple[tuple[object, ...] | None, ...]


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    #: vLLM: one entry per block, the (untagged) extra keys hashed into it.
    extra_keys: ExtraKeys | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    #: SGLang only (vLLM carries the salt inside ``extra_keys``).
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event tag this code does not know (a newer engine): skipped, counted."""

    tag: str


Event: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared | UnknownEvent


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]
    #: The publisher's data-parallel rank, when it says.
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One ZMQ message of the stream: its sequence number and msgpack payload."""

    seq: int
    payload: bytes


#: Positional field order of array-form events, per engine (declaration order).
_POSITIONAL: dict[Engine, dict[str, tuple[str, ...]]] = {
    "vllm": {tag: tuple(f.name for f in fields) for tag, fields in vllm_schema.EVENTS.items()},
    "sglang": {
        "BlockStored": (
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "cache_salt",
            "session_id",
            "lora_name",
        ),
        "BlockRemoved": ("block_hashes", "medium"),
        "AllBlocksCleared": (),
    },
}

_REQUIRED_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size")


def decode_batch(payload: bytes, *, engine: Engine = "vllm") -> EventBatch:
    """Decode one msgpack ``EventBatch`` payload."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EventDecodeError("msgpack", f"undecodable payload ({exc})") from exc
    if not isinstance(obj, list) or len(obj) < 2:
        raise EventDecodeError("batch", "a batch is an array [ts, events, rank?]")
    ts, events = obj[0], obj[1]
    if not _is_num(ts):
        raise EventDecodeError("batch", f"ts is {type(ts).__name__}, not a number")
    if not isinstance(events, list):
        raise EventDecodeError("batch", "events is not an array")
    rank = obj[2] if len(obj) > 2 else None
    if rank is not None and not _is_int(rank):
        raise EventDecodeError("batch", "rank is not an integer")
    return EventBatch(float(ts), tuple(_event(ev, engine) for ev in events), rank)


def split_live(frames: Sequence[bytes]) -> Message:
    """``[topic, seq (8-byte big-endian unsigned), payload]`` of the PUB stream."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise EventDecodeError("framing", f"expected [topic, seq(8), payload], got {len(frames)} frames")
    return Message(int.from_bytes(frames[1], "big"), bytes(frames[2]))


def split_replay(frames: Sequence[bytes]) -> Message | None:
    """A replay reply as a DEALER sees it; ``None`` for the end marker.

    ``[b"", seq, payload]`` (vLLM <= 0.25) or ``[b"", topic, seq, payload]`` (>= 0.26);
    the end marker carries sequence -1 and an empty payload.
    """
    if len(frames) not in (3, 4) or frames[0] != b"" or len(frames[-2]) != 8:
        raise EventDecodeError("replay", f"unexpected replay reply of {len(frames)} frames")
    seq = int.from_bytes(frames[-2], "big", signed=True)
    if seq == END_SEQ:
        return None
    if seq < 0:
        raise EventDecodeError("replay", f"negative replay sequence {seq}")
    return Message(seq, bytes(frames[-1]))


def normalize_hash(value: object) -> int:
    """One identity per block: u64 for ints (two's complement of SGLang's signed i64),
    the low 64 bits of the big-endian digest for bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & MASK64
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & MASK64
    raise EventDecodeError("event", f"block hash is {type(value).__name__}, not int or bytes")


# -- internals ---------------------------------------------------------------------------


def _event(raw: object, engine: Engine) -> Event:
    fields: Mapping[str, Any]
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw:
        tag = raw[0]
        names = _POSITIONAL[engine].get(tag, ()) if isinstance(tag, str) else ()
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise EventDecodeError("event", "an event is a non-empty array or a map")
    if not isinstance(tag, str):
        raise EventDecodeError("event", "event tag is not a string")
    if tag == "BlockStored":
        return _stored(fields)
    if tag == "BlockRemoved":
        if "block_hashes" not in fields:
            raise EventDecodeError("event", "BlockRemoved without block_hashes")
        return BlockRemoved(
            _hashes(fields["block_hashes"]),
            _opt_str(fields, "medium"),
            _opt_int(fields, "group_idx"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return UnknownEvent(tag)


def _stored(f: Mapping[str, Any]) -> BlockStored:
    missing = [k for k in _REQUIRED_STORED if k not in f]
    if missing:
        raise EventDecodeError("event", f"BlockStored without {', '.join(missing)}")
    tokens = f["token_ids"]
    # Every element exactly an ``int`` (``bool`` is not): one C-level pass over the types
    # instead of a Python call per token id (the largest cost of decoding a BlockStored).
    if not isinstance(tokens, list) or not set(map(type, tokens)) <= _INT_ONLY:
        raise EventDecodeError("event", "token_ids is not an array of integers")
    block_size = f["block_size"]
    if not _is_int(block_size) or block_size <= 0:
        raise EventDecodeError("event", f"block_size {block_size!r} is not a positive integer")
    parent = f["parent_block_hash"]
    return BlockStored(
        block_hashes=_hashes(f["block_hashes"]),
        parent_block_hash=None if parent is None else normalize_hash(parent),
        token_ids=tuple(tokens),
        block_size=block_size,
        lora_id=_opt_int(f, "lora_id"),
        medium=_opt_str(f, "medium"),
        lora_name=_opt_str(f, "lora_name"),
        extra_keys=_extra_keys(f.get("extra_keys")),
        group_idx=_opt_int(f, "group_idx"),
        kv_cache_spec_kind=_opt_str(f, "kv_cache_spec_kind"),
        cache_salt=_opt_str(f, "cache_salt"),
    )


def _hashes(raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise EventDecodeError("event", "block_hashes is not an array")
    return tuple(normalize_hash(h) for h in raw)


def _extra_keys(raw: object) -> ExtraKeys | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise EventDecodeError("event", "extra_keys is not an array")
    out: list[tuple[object, ...] | None] = []
    for block in raw:
        if block is None:
            out.append(None)
        elif isinstance(block, list):
            out.append(tuple(tuple(k) if isinstance(k, list) else k for k in block))
        else:
            raise EventDecodeError("event", "an extra_keys entry is not an array or null")
    return tuple(out)


def _opt_str(f: Mapping[str, Any], name: str) -> str | None:
    v = f.get(name)
    if v is None or isinstance(v, str):
        return v
    raise EventDecodeError("event", f"{name} is {type(v).__name__}, not a string")


def _opt_int(f: Mapping[str, Any], name: str) -> int | None:
    v = f.get(name)
    if v is None or _is_int(v):
        return v
    raise EventDecodeError("event", f"{name} is {type(v).__name__}, not an integer")


_INT_ONLY = frozenset({int})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, float) or _is_int(v)
