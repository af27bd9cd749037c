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
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import xxhash

Clock = Callable[[], float]

_xxh64 = xxhash.xxh64_intdigest


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
        #: replica -> key -> recorded at, least recently recorded first.
        self._lru: dict[str, OrderedDict[int, float]] = {}
        self._holders: dict[int, set[str]] = {}
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
        first = self._holders.get(keys[0]) if keys else None
        if not first:
            return {}
        cut = self._clock() - self.ttl_s
        out: dict[str, int] = {}
        for rid in replicas:
            lru = self._lru.get(rid)
            if rid not in first or lru is None:
                continue

            def missing(i: int, lru: OrderedDict[int, float] = lru) -> bool:
                return lru.get(keys[i], cut) <= cut

            blocks = bisect.bisect_left(range(len(keys)), True, key=missing)
            if blocks:
                out[rid] = blocks
        return out

    def record(self, replica_id: str, keys: Sequence[int]) -> None:
        """``replica_id`` was sent a prompt with ``keys``: it probably caches them now."""
        now = self._clock()
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
        cut = now - self.ttl_s
        while lru:
            key, at = next(iter(lru.items()))
            if at > cut:
                break
            self._drop(replica_id, lru, key)
        for key in reversed(keys):
            if key in lru:
                lru.move_to_end(key)
            else:
                self._holders.setdefault(key, set()).add(replica_id)
                self._size += 1
            lru[key] = now
        while len(lru) > self.capacity_blocks:
            self._drop(replica_id, lru, next(iter(lru)))
        if not lru:
            del self._lru[replica_id]

    def forget(self, replica_id: str) -> None:
        """Drop everything recorded for ``replica_id`` (endpoint removed)."""
        lru = self._lru.pop(replica_id, None)
        if lru is None:
            return
        for key in lru:
            self._unhold(replica_id, key)
        self._size -= len(lru)

    def _drop(self, replica_id: str, lru: OrderedDict[int, float], key: int) -> None:
        del lru[key]
        self._size -= 1
        self._unhold(replica_id, key)

    def _unhold(self, replica_id: str, key: int) -> None:
        holders = self._holders[key]
        holders.discard(replica_id)
        if not holders:
            del self._holders[key]
