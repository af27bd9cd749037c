"""vLLM's KV-event field schema across releases: one source for the decoder (positional
order of array-form events) and the fake engine's encoder (which fields a version has,
and which carry a default and so are omitted from map-form events when ``None``).

Read from vLLM's ``vllm/distributed/kv_events.py`` of every release 0.9.0 .. 0.33.0
(shared/research/protocols.md §1.5). Declaration order is wire order.
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``(major, minor, patch)`` of a vLLM release.
Version = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    #: The first release whose struct has the field.
    since: Version
    #: Declared with a default: msgspec's ``omit_defaults`` leaves it out of maps when ``None``.
    has_default: bool


BLOCK_STORED: tuple[Field, ...] = (
    Field("block_hashes", (0, 9, 0), False),
    Field("parent_block_hash", (0, 9, 0), False),
    Field("token_ids", (0, 9, 0), False),
    Field("block_size", (0, 9, 0), False),
    Field("lora_id", (0, 9, 0), False),
    Field("medium", (0, 10, 2), False),
    Field("lora_name", (0, 14, 0), False),
    Field("extra_keys", (0, 17, 0), True),
    Field("group_idx", (0, 20, 0), True),
    Field("kv_cache_spec_kind", (0, 23, 0), True),
    Field("kv_cache_spec_sliding_window", (0, 23, 0), True),
    Field("locality", (0, 26, 0), True),
    Field("ownership", (0, 29, 0), True),
    Field("session_id", (0, 30, 0), True),
    Field("lookahead_token_ids", (0, 33, 0), True),
)
BLOCK_REMOVED: tuple[Field, ...] = (
    Field("block_hashes", (0, 9, 0), False),
    Field("medium", (0, 10, 2), False),
    Field("group_idx", (0, 20, 0), True),
    Field("locality", (0, 26, 0), True),
    Field("ownership", (0, 29, 0), True),
)
ALL_BLOCKS_CLEARED: tuple[Field, ...] = ()

#: Event tag (class name) -> fields.
EVENTS: dict[str, tuple[Field, ...]] = {
    "BlockStored": BLOCK_STORED,
    "BlockRemoved": BLOCK_REMOVED,
    "AllBlocksCleared": ALL_BLOCKS_CLEARED,
}
