"""Prefix cache semantics (vLLM v1 block pool): hits are the longest cached leading run,
capped below the prompt length; LRU eviction of unreferenced blocks with the tail of a
finished sequence first; capacity; the events each operation records."""

from __future__ import annotations

from inference_cache.fakeengine import hashing
from inference_cache.fakeengine.events import AllBlocksCleared, BlockRemoved, BlockStored
from inference_cache.fakeengine.hashing import BlockHasher, LoRA
from inference_cache.fakeengine.prefix_cache import PrefixCache, Sequence

V033 = (0, 33, 0)


def cache(num_gpu_blocks: int = 9, version: tuple[int, int, int] = V033) -> PrefixCache:
    return PrefixCache(
        num_gpu_blocks=num_gpu_blocks, hasher=BlockHasher.create("sha256_cbor", "0", 4, version)
    )


def run(pc: PrefixCache, tokens: list[int], max_tokens: int = 1, **kw: object) -> Sequence:
    seq = Sequence(list(tokens), max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    assert pc.admit(seq)
    return seq


def ext(pc: PrefixCache, tokens: list[int]) -> list[int]:
    return [hashing.external(h) for h in pc.hasher.extend([], tokens)]


def test_store_event_for_the_full_prompt_blocks() -> None:
    pc = cache()
    seq = run(pc, list(range(10)))
    assert seq.num_cached_tokens == 0
    (stored,) = pc.take_events()
    assert stored == BlockStored(
        ext(pc, list(range(8))),
        None,
        list(range(8)),
        4,
        extra_keys=[None, None],
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )
    assert pc.num_free_blocks() == 8 - 3  # 3 blocks: two full, one partial


def test_hit_is_the_cached_run_capped_below_the_prompt() -> None:
    pc = cache()
    pc.free(run(pc, list(range(8))))
    pc.take_events()
    # the same 8 tokens: block 1 would cover the last token, which must be recomputed
    again = run(pc, list(range(8)))
    assert again.num_cached_tokens == 4
    # the recomputed block 1 is stored (and announced) again, chained on block 0
    h = ext(pc, list(range(8)))
    (stored,) = pc.take_events()
    assert isinstance(stored, BlockStored)
    assert (stored.block_hashes, stored.parent_block_hash, stored.token_ids) == ([h[1]], h[0], [4, 5, 6, 7])
    pc.free(again)
    longer = run(pc, list(range(9)))
    assert longer.num_cached_tokens == 8
    assert pc.take_events() == []  # no newly full block
    assert pc.queries == 8 + 8 + 9 and pc.hits == 4 + 8


def test_decode_fills_blocks_and_announces_them_with_the_parent() -> None:
    pc = cache()
    seq = run(pc, [1, 2, 3, 4, 5, 6], max_tokens=4)
    pc.take_events()
    seq.token_ids.append(100)  # first output token (computed with the prefill step)
    pc.advance(seq, 101)  # computes token 7 (100): 7 computed, no new full block
    assert pc.take_events() == []
    pc.advance(seq, 102)  # computes 101: 8 computed, block 1 full
    (stored,) = pc.take_events()
    full = ext(pc, [1, 2, 3, 4, 5, 6, 100, 101])
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == full[1:] and stored.parent_block_hash == full[0]
    assert stored.token_ids == [5, 6, 100, 101]


def test_lru_evicts_unreferenced_blocks_tail_first() -> None:
    pc = cache(num_gpu_blocks=5)  # 4 usable blocks of 4 tokens
    a = run(pc, list(range(16)))  # 4 blocks: the whole pool
    assert pc.num_free_blocks() == 0
    pc.free(a)
    pc.take_events()
    b = run(pc, [50, 51, 52, 53, 54])  # 2 new blocks: evicts a's last two blocks (tail first)
    hashes = ext(pc, list(range(16)))
    assert pc.take_events()[:2] == [
        BlockRemoved([hashes[3]], group_idx=0),
        BlockRemoved([hashes[2]], group_idx=0),
    ]
    pc.free(b)
    c = run(pc, list(range(16)))
    assert c.num_cached_tokens == 8  # a's first two blocks survived


def test_capacity_refuses_without_side_effects() -> None:
    pc = cache(num_gpu_blocks=5)
    a = run(pc, list(range(12)), max_tokens=1)  # 3 blocks
    pc.take_events()
    big = Sequence(list(range(100, 108)), max_tokens=1)  # needs 2 blocks, 1 free
    assert not pc.admit(big)
    assert pc.queries == 12 and pc.take_events() == []
    pc.free(a)
    assert pc.admit(big)


def test_hit_blocks_are_protected_from_eviction() -> None:
    pc = cache(num_gpu_blocks=4)  # 3 usable
    pc.free(run(pc, list(range(8))))
    seq = run(pc, list(range(9)))  # hits 2 blocks (from the free queue), needs 1 more
    assert seq.num_cached_tokens == 8 and pc.num_free_blocks() == 0


def test_salt_and_lora_change_hashes_and_are_published() -> None:
    pc = cache()
    lora = LoRA("ad", "/adapters/ad", 3)
    run(pc, list(range(8)), cache_salt="s", lora=lora)
    (stored,) = pc.take_events()
    assert isinstance(stored, BlockStored)
    assert stored.extra_keys == [("ad", "s"), ("ad",)]
    assert stored.lora_id == 3 and stored.lora_name == "ad"
    assert stored.block_hashes != ext(pc, list(range(8)))
    plain = run(pc, list(range(9)))
    assert plain.num_cached_tokens == 0


def test_reset_refused_while_in_use_then_clears() -> None:
    pc = cache()
    seq = run(pc, list(range(8)))
    pc.take_events()
    assert not pc.reset()
    pc.free(seq)
    assert pc.reset()
    assert pc.take_events() == [AllBlocksCleared()]
    assert pc.cached_hashes() == set()
    assert run(pc, list(range(9))).num_cached_tokens == 0


def test_forced_reset_is_silent() -> None:
    pc = cache()
    run(pc, list(range(8)))
    assert pc.reset(force=True)
    assert pc.take_events() == [] and pc.cached_hashes() == set()


def test_usage() -> None:
    pc = cache(num_gpu_blocks=5)
    seq = run(pc, list(range(6)))
    assert pc.usage() == 0.5
    pc.free(seq)
    assert pc.usage() == 0.0
