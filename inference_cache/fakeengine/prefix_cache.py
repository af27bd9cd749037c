"""The prefix cache of one simulated engine: vLLM v1 ``BlockPool`` + ``KVCacheManager``.

Owner: ``inference_cache.fakeengine``; driven by ``scheduler`` (admit, advance, free,
reset), it records KV events that ``scheduler`` hands to the publisher (``take_events``, as
vLLM's scheduler does once per step). Semantics kept from vLLM:

* ``num_gpu_blocks`` blocks, of which block 0 is the reserved null block;
* only full blocks carry a hash; a request's hit is its longest run of cached leading
  blocks, capped so that at least one prompt token is recomputed
  (``max_cache_hit_length = num_tokens - 1``);
* free blocks form an LRU queue; a hit takes its block out of it (``touch``); a finished
  request returns its blocks tail first, so a sequence's last blocks are evicted first;
* a new block comes from the head of the queue; if it still held a hash, that hash is
  evicted (one ``BlockRemoved`` each);
* newly full blocks of one request are announced together (one ``BlockStored`` with the
  parent hash, the tokens, LoRA and the published extra keys);
* ``reset`` succeeds only when no block is in use and announces ``AllBlocksCleared``.

Simplification: instead of preemption, a request is admitted only when the blocks its whole
sequence may need (prompt + ``max_tokens`` - 1 tokens) can be reserved.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from inference_cache.fakeengine import events as ev
from inference_cache.fakeengine import hashing
from inference_cache.fakeengine.hashing import BlockHasher, LoRA


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass(eq=False)
class Sequence:
    """One request's view of the cache."""

    token_ids: list[int]
    max_tokens: int
    lora: LoRA | None = None
    cache_salt: str | None = None
    num_prompt_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    reserved: int = 0

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)


@dataclass(frozen=True)
class CacheStats:
    queries: int
    hits: int
    usage: float
    num_free_blocks: int


class PrefixCache:
    def __init__(self, *, num_gpu_blocks: int, hasher: BlockHasher) -> None:
        if num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be at least 2 (block 0 is the null block)")
        self.hasher = hasher
        self.block_size = hasher.block_size
        self.num_gpu_blocks = num_gpu_blocks
        self._blocks = [Block(i) for i in range(num_gpu_blocks)]
        # block 0 is vLLM's null block: never free, never cached
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks[1:])
        self._cached: dict[bytes, dict[int, Block]] = {}
        self._reserved = 0
        self._events: list[ev.Event] = []
        self.queries = 0
        self.hits = 0

    # -- observation ------------------------------------------------------------------------

    @property
    def usable_blocks(self) -> int:
        return self.num_gpu_blocks - 1

    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.usable_blocks

    def stats(self) -> CacheStats:
        return CacheStats(self.queries, self.hits, self.usage(), len(self._free))

    def cached_hashes(self) -> set[bytes]:
        return set(self._cached)

    def take_events(self) -> list[ev.Event]:
        out, self._events = self._events, []
        return out

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # -- request lifecycle ------------------------------------------------------------------

    def admit(self, seq: Sequence) -> bool:
        """Look the prompt up, reserve the sequence's blocks, allocate and cache the prompt.
        ``False`` (nothing changed) when the blocks are not available now."""
        h = self.hasher
        h.extend(seq.block_hashes, seq.token_ids, lora=seq.lora, cache_salt=seq.cache_salt)
        max_hit_blocks = (seq.num_prompt_tokens - 1) // self.block_size
        hits: list[Block] = []
        for block_hash in seq.block_hashes[:max_hit_blocks]:
            found = self._cached.get(block_hash)
            if not found:
                break
            hits.append(next(iter(found.values())))
        total = self.blocks_needed(self._final_computed(seq))
        free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if total - len(hits) > len(self._free) - free_hits - self._reserved:
            return False
        self.queries += seq.num_prompt_tokens
        self.hits += len(hits) * self.block_size
        for block in hits:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
        seq.blocks = hits
        seq.num_cached_blocks = len(hits)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.reserved = total - len(hits)
        self._reserved += seq.reserved
        self._compute(seq, seq.num_prompt_tokens)
        return True

    def advance(self, seq: Sequence, new_token: int) -> None:
        """One decode step: the last token's KV is computed, ``new_token`` is appended."""
        self._compute(seq, len(seq.token_ids))
        seq.token_ids.append(new_token)

    def free(self, seq: Sequence) -> None:
        """Return the sequence's blocks, tail first, and its unused reservation."""
        for block in reversed(seq.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
        seq.blocks = []
        self._reserved -= seq.reserved
        seq.reserved = 0

    def reset(self, *, force: bool = False) -> bool:
        """``reset_prefix_cache``: drop every hash and announce ``AllBlocksCleared``; refused
        while blocks are in use unless ``force`` (a restarted engine: no event at all)."""
        if not force and len(self._free) != self.usable_blocks:
            return False
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()
        if force:
            self._events.clear()
        else:
            self._events.append(ev.AllBlocksCleared())
        return True

    # -- internals --------------------------------------------------------------------------

    def _final_computed(self, seq: Sequence) -> int:
        return seq.num_prompt_tokens + max(seq.max_tokens, 1) - 1

    def _compute(self, seq: Sequence, num_computed: int) -> None:
        while len(seq.blocks) < self.blocks_needed(num_computed):
            seq.blocks.append(self._allocate())
            seq.reserved -= 1
            self._reserved -= 1
        self.hasher.extend(seq.block_hashes, seq.token_ids, lora=seq.lora, cache_salt=seq.cache_salt)
        num_full = num_computed // self.block_size
        if num_full > seq.num_cached_blocks:
            self._cache_full_blocks(seq, seq.num_cached_blocks, num_full)
            seq.num_cached_blocks = num_full

    def _allocate(self) -> Block:
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            self._evict(block)
        block.ref_cnt = 1
        return block

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        same = self._cached[block.block_hash]
        del same[block.block_id]
        if not same:
            del self._cached[block.block_hash]
        self._events.append(
            ev.BlockRemoved([hashing.external(block.block_hash)], medium=ev.MEDIUM_GPU, group_idx=0)
        )
        block.block_hash = None

    def _cache_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        bs = self.block_size
        new_hashes = seq.block_hashes[start:end]
        for block, block_hash in zip(seq.blocks[start:end], new_hashes, strict=True):
            block.block_hash = block_hash
            self._cached.setdefault(block_hash, {})[block.block_id] = block
        lora = seq.lora
        self._events.append(
            ev.BlockStored(
                block_hashes=[hashing.external(h) for h in new_hashes],
                parent_block_hash=hashing.external(seq.block_hashes[start - 1]) if start else None,
                token_ids=seq.token_ids[start * bs : end * bs],
                block_size=bs,
                lora_id=lora.int_id if lora else None,
                medium=ev.MEDIUM_GPU,
                lora_name=lora.name if lora else None,
                extra_keys=[
                    hashing.event_extra_keys(self.hasher.extra_keys(i, lora, seq.cache_salt))
                    for i in range(start, end)
                ],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        )
