"""Counters of KV-event ingestion (one instance per engine endpoint).

Owner: ``inference_cache.index.kvevents``. Written by the ``mapper`` and the
``subscriber``; read by whoever exports metrics (the server turns them into Prometheus
counters). Plain mutable attributes: single-threaded asyncio, no locking.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: The ``Counters.events`` keys: every engine event type, and ``unknown``.
STORED, REMOVED, CLEARED, UNKNOWN = EVENT_TYPES = (
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "unknown",
)


@dataclass(slots=True)
class Counters:
    #: Decoded events by type: ``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``, or
    #: ``unknown`` (a tag this release does not know; skipped).
    events: Counter[str] = field(default_factory=Counter)
    #: Batches decoded and applied.
    batches: int = 0
    #: Undecodable input by kind (``framing``, ``msgpack``, ``batch``, ``event``, ``replay``).
    decode_errors: Counter[str] = field(default_factory=Counter)
    #: Sequence gaps seen on the live stream.
    gaps: int = 0
    #: Replay requests sent / batches received from replay.
    replays_requested: int = 0
    replayed_batches: int = 0
    #: Batches already applied (replay overlapping the live stream), dropped.
    duplicates: int = 0
    #: Rank state dropped because events were lost for good (no/short/failed replay).
    resyncs: int = 0
    #: Sequence went backwards: the engine's publisher restarted.
    restarts: int = 0
    #: Socket (re)creations after an error.
    reconnects: int = 0
    #: Stored blocks whose non-null parent we do not know (never re-rooted).
    orphan_blocks: int = 0
    #: Stored blocks not indexed, by reason (``medium``, ``kv_cache_spec_kind``,
    #: ``group_idx``, ``block_size``, ``token_count``, ``multimodal``, ``prompt_embeds``,
    #: ``lora_id_unmapped``).
    skipped_blocks: Counter[str] = field(default_factory=Counter)
    #: Removals of engine hashes we never mapped (or filtered removals), ignored.
    unknown_removals: int = 0
