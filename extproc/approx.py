"""The approximate prefix index: where we *sent* a prompt's leading characters, for models
with no tokenizer or no KV events.

Owner: ``inference_cache.extproc`` (the picker); pure, clock injected, also driven by the
trace-replay benchmark. After GIE's approximate prefix scorer (``anchors.md`` §1.6) with a
TTL as in Dynamo's ``ApproxKvIndexer``. Place in the flow::

    openai.approx_text(request) --keys(model, salt, text)--> chunk keys
        --match(keys, candidates)--> leading matched blocks per replica --> scoring
    decision --record(chosen, keys)--> per-replica LRU (what that engine probably caches)

Keys: the text (bytes) is cut into ``block_chars``-byte chunks, the trailing partial
chunk dropped and at most ``max_blocks`` kept; ``key_0 = xxh64(chunk_0, seed=root)``,
``key_i = xxh64(chunk_i, seed=key_{i-1})``, ``root = xxh64(model ‖ 0x00 ‖ salt)``, so a key
stands for the whole prefix up to its chunk, per model and ``cache_salt``.

Memory: each replica keeps an LRU of at most ``capacity_blocks`` keys (GIE's 31,250 = 500k
tokens / 16, Llama-3-8B on one H100) with the time it was recorded; a reverse map key ->
replicas answers ``match``; evicting a key from a replica's LRU removes the replica from
the reverse map. A decision's keys are recorded last-block first, so a prompt's first
block is its most recent entry and evicted last, as an engine frees a sequence tail first.
Entries older than ``ttl_s`` do not match and are dropped lazily by ``record``. Keys are a
chain and a prompt is recorded whole, so a replica's live keys are a union of prefixes and
its leading run is found by binary search (O(candidates x log(blocks)) per match).

Estimates: ``chars_per_token`` (4, as GIE) converts characters to tokens.
Not thread-safe: the picker runs on one event loop.

Storage holds only ints and floats in plain dicts and arrays, which the cyclic GC never
tracks: a per-replica ``OrderedDict`` and a ``set`` of replicas per key (250k tracked objects
at 8 replicas) were walked item by item by every full collection, inline in a request. A
replica's LRU is ``_Lru``: key -> last recorded time and log position, plus the log of keys
in record order whose stale records (a key recorded again later) are skipped when evicting;
holders are a bitmask of replica slots per key.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence

import xxhash

Clock = Callable[[], float]

_xxh64 = xxhash.xxh64_intdigest


_US = 1_000_000
_POS_SHIFT = 64
_AT_MASK = (1 << _POS_SHIFT) - 1


def _us(t: float) -> int:
    return int(t * _US)


class _Lru:
    """Keys by last record, least recent first, outside the cyclic GC: one int per key (its
    latest record's log position and time) and the record log of keys, an ``array``; a log
    record is live while it is its key's latest, stale ones are skipped and compacted away."""

    __slots__ = ("_base", "_head", "_log", "entries")

    def __init__(self) -> None:
        #: key -> ``log position << 64 | recorded at (µs)`` of its latest record (positions
        #: count the records compacted away).
        self.entries: dict[int, int] = {}
        self._log = array.array("Q")
        self._base = 0  # records compacted away
        self._head = 0  # the log's first record not yet consumed

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[int]:
        return iter(self.entries)

    def at(self, key: int) -> int:
        """When ``key`` was last recorded, in µs (it must be held)."""
        return self.entries[key] & _AT_MASK

    def record(self, keys: Sequence[int], now: float) -> list[int]:
        """Record ``keys`` (distinct: a chain) in this order, as the most recent; -> the new
        ones."""
        entries = self.entries
        new = [key for key in keys if key not in entries]
        start = self._base + len(self._log)
        t = _us(now)
        entries.update(zip(keys, [p << _POS_SHIFT | t for p in range(start, start + len(keys))], strict=True))
        self._log.extend(keys)
        return new

    def oldest(self) -> int | None:
        """The least recently recorded key (stale log records skipped)."""
        log, entries = self._log, self.entries
        while self._head < len(log):
            key = log[self._head]
            value = entries.get(key)
            if value is not None and value >> _POS_SHIFT == self._base + self._head:
                return key
            self._head += 1
        return None

    def pop_oldest(self, n: int = 1) -> list[int]:
        """Remove and return the ``n`` least recently recorded keys (fewer if it has fewer)."""
        log, entries = self._log, self.entries
        base, head, end = self._base, self._head, len(self._log)
        out: list[int] = []
        while len(out) < n and head < end:
            key = log[head]
            value = entries.get(key)
            if value is not None and value >> _POS_SHIFT == base + head:
                del entries[key]
                out.append(key)
            head += 1
        self._head = head
        if head > 4096 and head * 2 > end:  # compact the log
            del log[:head]
            self._base += head
            self._head = 0
        return out


class ApproxIndex:
    def __init__(
        self,
        *,
        block_chars: int = 64,
        max_blocks: int = 256,
        capacity_blocks: int = 31_250,
        chars_per_token: float = 4.0,
        ttl_s: float = 120.0,
        clock: Clock,
    ) -> None:
        """``block_chars``: bytes per chunk (GIE: 16 tokens x 4 characters); ``max_blocks``:
        chunks hashed per prompt (GIE's ``maxPrefixBlocksToMatch``); ``capacity_blocks``:
        LRU size per replica; ``ttl_s``: seconds an entry counts (Dynamo's 120 s)."""
        if block_chars <= 0 or max_blocks <= 0 or capacity_blocks <= 0:
            raise ValueError("block_chars, max_blocks and capacity_blocks must be positive")
        if not chars_per_token > 0 or not ttl_s > 0:
            raise ValueError("chars_per_token and ttl_s must be positive")
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.capacity_blocks = capacity_blocks
        self.chars_per_token = chars_per_token
        self.ttl_s = ttl_s
        self._clock = clock
        #: replica -> its keys by last recorded time.
        self._lru: dict[str, _Lru] = {}
        #: key -> bitmask of the slots (``_slots``) of the replicas holding it.
        self._holders: dict[int, int] = {}
        self._slots: dict[str, int] = {}
        self._free_slots: list[int] = []
        self._size = 0

    @property
    def size(self) -> int:
        """(replica, block) entries held (expired ones included until dropped)."""
        return self._size

    def keys(self, model: str, salt: str | None, text: bytes) -> list[int]:
        """The chunk keys of ``text``'s full chunks (at most ``max_blocks``)."""
        h = _xxh64(
            model.encode("utf-8", "surrogatepass") + b"\0" + (salt or "").encode("utf-8", "surrogatepass")
        )
        bc = self.block_chars
        view = memoryview(text)
        out: list[int] = []
        for i in range(min(len(text) // bc, self.max_blocks)):
            h = _xxh64(view[i * bc : (i + 1) * bc], seed=h)
            out.append(h)
        return out

    def tokens(self, blocks: int) -> int:
        """Estimated tokens in ``blocks`` chunks."""
        return int(blocks * self.block_chars / self.chars_per_token)

    def match(self, keys: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """Leading matched blocks per replica of ``replicas`` (only those with >= 1)."""
        first = self._holders.get(keys[0], 0) if keys else 0
        if not first:
            return {}
        cut = _us(self._clock() - self.ttl_s)
        out: dict[str, int] = {}
        for rid in replicas:
            lru = self._lru.get(rid)
            if lru is None or not first >> self._slots[rid] & 1:
                continue

            def missing(i: int, entries: dict[int, int] = lru.entries) -> bool:
                return entries.get(keys[i], 0) & _AT_MASK <= cut

            blocks = bisect.bisect_left(range(len(keys)), True, key=missing)
            if blocks:
                out[rid] = blocks
        return out

    def record(self, replica_id: str, keys: Sequence[int]) -> None:
        """``replica_id`` was sent a prompt with ``keys``: it probably caches them now."""
        now = self._clock()
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = _Lru()
            self._slots[replica_id] = self._free_slots.pop() if self._free_slots else len(self._slots)
        bit = 1 << self._slots[replica_id]
        cut = now - self.ttl_s
        cut_us = _us(cut)
        while (oldest := lru.oldest()) is not None and lru.at(oldest) <= cut_us:
            self._unhold(bit, lru.pop_oldest())
        holders = self._holders
        new = lru.record(keys[::-1], now)
        for key in new:
            holders[key] = holders.get(key, 0) | bit
        self._size += len(new)
        if len(lru) > self.capacity_blocks:
            self._unhold(bit, lru.pop_oldest(len(lru) - self.capacity_blocks))
        if not lru:
            self._forget_slot(replica_id)

    def forget(self, replica_id: str) -> None:
        """Drop everything recorded for ``replica_id`` (endpoint removed)."""
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        bit = 1 << self._slots[replica_id]
        self._unhold(bit, lru)
        self._forget_slot(replica_id)

    def _forget_slot(self, replica_id: str) -> None:
        del self._lru[replica_id]
        self._free_slots.append(self._slots.pop(replica_id))

    def _unhold(self, bit: int, keys: Iterable[int]) -> None:
        """``keys`` left the replica of ``bit`` (its entries, no longer counted)."""
        holders, mask = self._holders, ~bit
        dropped = 0
        for key in keys:
            held = holders[key] & mask
            if held:
                holders[key] = held
            else:
                del holders[key]
            dropped += 1
        self._size -= dropped
