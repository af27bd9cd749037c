"""The engine-hash -> fingerprint mapper against a recording sink (no sockets):
chaining, orphans, filters, salt, adapters, removals, clears, refcounted ranks, SGLang
page grouping."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gc_checks
import pytest
import vllm_samples
from tokenizers import Tokenizer

from inference_cache.index import bytematch
from inference_cache.index import fingerprint as fp
from inference_cache.index.bytekeys import ByteIndex, ByteTable
from inference_cache.index.kvevents import decode
from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.index.kvevents.mapper import Mapper
from inference_cache.index.store import Index, IndexSettings
from inference_cache.index.types import Scope

from .conftest import (
    CLEARED,
    RecordingSink,
    batch,
    sglang_removed,
    sglang_stored,
    vllm_removed,
    vllm_stored,
)

T32 = list(range(1, 33))
SCOPE = Scope("t1", "m1", "vllm")


def _mapper(sink: RecordingSink, **kw: Any) -> Mapper:
    return Mapper(EndpointConfig(replica_id="r1", model="m1", kv_events="tcp://x:1", tenant="t1", **kw), sink)


def _apply(m: Mapper, *events: dict[str, Any], rank: int = 0, engine: str = "vllm", ts: float = 5.0) -> None:
    m.apply(decode.decode_batch(batch(events, ts=ts), engine=engine), rank=rank)  # type: ignore[arg-type]


def test_fresh_chain_then_child_equals_one_long_chain(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([100], None, T32[:16]))
    _apply(m, vllm_stored([200], 100, T32[16:]))
    want = fp.chain_keys(T32, 16)
    assert sink.calls == [
        ("stored", SCOPE, "r1", [want[0]], [16], 5.0),
        ("stored", SCOPE, "r1", [want[1]], [32], 5.0),
    ]
    assert fp.key_int(want[0]) == 16863443419780771464  # the golden vector


def test_capture_stream_maps_and_removes(sink: RecordingSink) -> None:
    """The real 0.33 publisher's payloads, in order: int hashes, a child, a raw-bytes
    re-store of block 0 (same identity), a removal, a clear."""
    m = _mapper(sink)
    payloads = [f.payload for f in vllm_samples.capture()]
    want = fp.chain_keys(T32, 16)
    for p in payloads[:3]:
        m.apply(decode.decode_batch(p))
    assert sink.keys() == set(want)
    m.apply(decode.decode_batch(payloads[3]))  # BlockRemoved block1
    assert sink.keys() == {want[0]}
    m.apply(decode.decode_batch(payloads[4]))  # AllBlocksCleared
    assert sink.calls[-1] == ("cleared", "r1", "m1", "t1")
    assert m.counters.events == {"BlockStored": 3, "BlockRemoved": 1, "AllBlocksCleared": 1}


def test_orphan_is_never_rerooted(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([200, 201], 999, T32))
    assert sink.calls == []
    assert m.counters.orphan_blocks == 2


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        pytest.param(vllm_stored([1, 2], None, T32, medium="CPU"), "medium", id="medium-cpu"),
        pytest.param(vllm_stored([1, 2], None, T32, medium="cpu"), "medium", id="medium-lmcache"),
        pytest.param(
            vllm_stored([1, 2], None, T32, kv_cache_spec_kind="sliding_window", group_idx=0),
            "kv_cache_spec_kind",
            id="sliding-window",
        ),
        pytest.param(vllm_stored([1, 2], None, T32, group_idx=1), "group_idx", id="group-1-no-kind"),
        pytest.param(vllm_stored([1], None, T32, block_size=32), "block_size", id="block-size"),
        pytest.param(vllm_stored([1, 2], None, T32[:31]), "token_count", id="token-count"),
        pytest.param(vllm_stored([1, 2], None, T32, lora_id=7), "lora_id_unmapped", id="lora-id-unmapped"),
        pytest.param(
            vllm_stored([1, 2], None, T32, extra_keys=[[["img-hash", 0]], None]),
            "multimodal",
            id="multimodal",
        ),
        pytest.param(
            vllm_stored([1, 2], None, T32, extra_keys=[[b"\x00" * 32], None]), "prompt_embeds", id="embeds"
        ),
        pytest.param(vllm_stored([1, 2], None, [2**32, *T32[1:]]), "token_ids", id="token-out-of-u32"),
    ],
)
def test_filters_skip_and_count(sink: RecordingSink, event: dict[str, Any], reason: str) -> None:
    m = _mapper(sink)
    _apply(m, event)
    assert sink.calls == []
    assert m.counters.skipped_blocks == {reason: 2 if reason != "block_size" else 1}


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            vllm_stored([1, 2], None, T32, medium="gpu", kv_cache_spec_kind="mla_attention"), id="mla"
        ),
        pytest.param(vllm_stored([1, 2], None, T32, medium=None, group_idx=0), id="no-medium-group-0"),
        pytest.param(
            vllm_stored([1, 2], None, T32, kv_cache_spec_kind="full_attention", group_idx=1), id="kind-wins"
        ),
    ],
)
def test_indexed_variants(sink: RecordingSink, event: dict[str, Any]) -> None:
    m = _mapper(sink)
    _apply(m, event)
    assert sink.keys() == set(fp.chain_keys(T32, 16))


def test_multimodal_block_stops_the_chain_there(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([1, 2], None, T32, extra_keys=[None, [["img", 3]]]))
    assert sink.keys() == {fp.chain_keys(T32, 16)[0]}
    assert m.counters.skipped_blocks == {"multimodal": 1}


def test_salt_from_extra_keys_starts_a_salted_chain(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([1, 2], None, T32, lora_name="ad", extra_keys=[["ad", "tenant-salt"], ["ad"]]))
    _apply(m, vllm_stored([3], None, T32[:16]))  # same tokens, no salt
    salted, plain = sink.stored()
    assert salted[1] == Scope("t1", "m1", "vllm", "ad")
    assert salted[3] == fp.chain_keys(T32, 16, salt="tenant-salt")
    assert plain[3] == fp.chain_keys(T32[:16], 16)
    assert set(salted[3]).isdisjoint(plain[3])


def test_lora_adapter_scoping(sink: RecordingSink) -> None:
    m = _mapper(sink, lora_names={3: "mapped"})
    _apply(m, vllm_stored([1], None, T32[:16], lora_name="named"))
    _apply(m, vllm_stored([2], None, T32[:16], lora_id=3))
    _apply(m, vllm_stored([4], None, T32[:16]))
    assert [c[1].adapter for c in sink.stored()] == ["named", "mapped", ""]
    # removal goes to the scope the key was stored under
    _apply(m, vllm_removed([2]))
    assert sink.calls[-1] == (
        "removed",
        Scope("t1", "m1", "vllm", "mapped"),
        "r1",
        fp.chain_keys(T32[:16], 16),
    )


def test_removals_unknown_filtered_and_other_groups(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([1, 2], None, T32, group_idx=0, kv_cache_spec_kind="full_attention"))
    _apply(m, vllm_removed([2], medium="CPU"))  # the offloaded copy went away, not ours
    _apply(m, vllm_removed([2], group_idx=1))  # sliding-window group shares hashes
    _apply(m, vllm_removed([77]))
    assert len(sink.keys()) == 2
    assert m.counters.unknown_removals == 1
    assert m.counters.skipped_blocks == {"medium": 1, "group_idx": 1}
    _apply(m, vllm_removed([2], group_idx=0))
    assert sink.keys() == {fp.chain_keys(T32, 16)[0]}


def test_restore_of_same_hash_refreshes_without_removal(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([1], None, T32[:16]), ts=1.0)
    _apply(m, vllm_stored([1], None, T32[:16]), ts=2.0)  # kv_cache_report_mode=full re-announce
    assert [c[0] for c in sink.calls] == ["stored", "stored"]
    _apply(m, vllm_removed([1]))
    assert sink.keys() == set()


def test_two_ranks_refcount_keys_of_one_replica(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([10, 11], None, T32), rank=0)
    _apply(m, vllm_stored([20, 21], None, T32), rank=1)  # other rank, other engine hashes
    keys = set(fp.chain_keys(T32, 16))
    _apply(m, vllm_removed([11]), rank=0)
    assert sink.keys() == keys  # rank 1 still holds block 1
    _apply(m, CLEARED, rank=1)  # rank 1 cleared: only what no rank holds goes
    assert sink.keys() == {fp.chain_keys(T32, 16)[0]}
    assert ("cleared", "r1", "m1", "t1") not in sink.calls
    _apply(m, vllm_removed([21]), rank=1)  # rank 1 forgot its hashes
    assert m.counters.unknown_removals == 1
    _apply(m, CLEARED, rank=0)
    assert sink.calls[-1] == ("cleared", "r1", "m1", "t1")


def test_drop_rank_of_only_rank_clears_replica(sink: RecordingSink) -> None:
    m = _mapper(sink)
    _apply(m, vllm_stored([10, 11], None, T32))
    m.drop_rank(0)
    assert sink.calls[-1] == ("cleared", "r1", "m1", "t1")
    _apply(m, vllm_stored([12], 11, T32[:16]))  # parent forgotten -> orphan
    assert m.counters.orphan_blocks == 1


# -- SGLang --------------------------------------------------------------------------------------


def _sglang_pages(
    tokens: list[int], *, first_hash: int = 1000, parent: int | None = None
) -> list[dict[str, Any]]:
    out = []
    for i, tok in enumerate(tokens):
        h = first_hash + i
        out.append(sglang_stored([h], parent, [tok], block_size=1))
        parent = h
    return out


def test_sglang_pages_group_into_model_blocks(sink: RecordingSink) -> None:
    m = _mapper(sink, engine="sglang", block_size=4)
    pages = _sglang_pages(list(range(1, 11)))  # 10 pages of 1 token: 2 full blocks + 2 pending
    for ev in pages:
        _apply(m, ev, engine="sglang")
    want = fp.chain_keys(list(range(1, 11)), 4)
    assert [c[3] for c in sink.stored()] == [[want[0]], [want[1]]]
    assert [c[4] for c in sink.stored()] == [[4], [8]]
    # pages 11 and 12 complete block 3 from the pending partial block
    _apply(m, sglang_stored([1010], 1009, [11], block_size=1), engine="sglang")
    _apply(m, sglang_stored([1011], 1010, [12], block_size=1), engine="sglang")
    assert sink.keys() == set(fp.chain_keys(list(range(1, 13)), 4))


def test_sglang_branch_inside_a_block(sink: RecordingSink) -> None:
    m = _mapper(sink, engine="sglang", block_size=4)
    for ev in _sglang_pages([1, 2, 3, 4]):
        _apply(m, ev, engine="sglang")
    # a sibling branch diverging at page 3: tokens 1,2,9,9
    _apply(m, sglang_stored([2002], 1001, [9], block_size=1), engine="sglang")
    _apply(m, sglang_stored([2003], 2002, [9], block_size=1), engine="sglang")
    assert sink.keys() == {fp.chain_keys([1, 2, 3, 4], 4)[0], fp.chain_keys([1, 2, 9, 9], 4)[0]}


def test_sglang_removed_page_removes_its_model_block(sink: RecordingSink) -> None:
    m = _mapper(sink, engine="sglang", block_size=4)
    for ev in _sglang_pages(list(range(1, 9))):
        _apply(m, ev, engine="sglang")
    k0, k1 = fp.chain_keys(list(range(1, 9)), 4)
    _apply(m, sglang_removed([1005]), engine="sglang")  # a middle page of block 2
    assert sink.keys() == {k0}
    assert sink.calls[-1][3] == [k1]
    _apply(m, sglang_removed([1007]), engine="sglang")  # the completing page: already gone
    assert sink.keys() == {k0}
    assert [c[0] for c in sink.calls].count("removed") == 1


def test_sglang_salt_lora_and_signed_hashes(sink: RecordingSink) -> None:
    m = _mapper(sink, engine="sglang", block_size=2)
    _apply(m, sglang_stored([-3], None, [1], cache_salt="s", lora_name="ad"), engine="sglang")
    _apply(m, sglang_stored([-4], -3, [2], cache_salt="s", lora_name="ad"), engine="sglang")
    (call,) = sink.stored()
    assert call[1].adapter == "ad"
    assert call[3] == fp.chain_keys([1, 2], 2, salt="s")


def test_sglang_multi_page_events_and_page_size_must_divide(sink: RecordingSink) -> None:
    m = _mapper(sink, engine="sglang", block_size=4)
    _apply(m, sglang_stored([1, 2], None, [1, 2, 3, 4], block_size=2), engine="sglang")
    assert sink.keys() == set(fp.chain_keys([1, 2, 3, 4], 4))
    _apply(m, sglang_stored([5], None, [1, 2, 3], block_size=3), engine="sglang")
    assert m.counters.skipped_blocks == {"block_size": 1}


# -- the byte-chain sink (issue #9) -------------------------------------------------------------


class _RecordingBytes(ByteIndex):
    """A real ``ByteIndex`` (token id ``i`` is byte ``i``) that also records what it heard."""

    def __init__(self, block_size: int = 16) -> None:
        super().__init__(ByteTable(tuple(bytes([i]) for i in range(256)), True), block_size)
        self.heard: list[tuple[Any, ...]] = []

    def blocks_stored(
        self,
        scope: Scope,
        replica_id: str,
        parent: int | None,
        keys: Sequence[bytes],
        token_ids: Sequence[int],
    ) -> None:
        self.heard.append(("stored", scope, replica_id, parent, list(keys), list(token_ids)))
        super().blocks_stored(scope, replica_id, parent, keys, token_ids)

    def blocks_removed(self, scope: Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        self.heard.append(("removed", scope, replica_id, list(keys)))
        super().blocks_removed(scope, replica_id, keys)

    def chain(self, scope: Scope = SCOPE) -> set[bytes]:
        with self.reading(scope) as view:
            return set(view.blocks)


def _bytes_mapper(sink: RecordingSink, bidx: ByteIndex, **kw: Any) -> Mapper:
    config = EndpointConfig(replica_id="r1", model="m1", kv_events="tcp://x:1", tenant="t1", **kw)
    return Mapper(config, sink, bytes_sink=bidx)


def test_bytes_sink_hears_the_same_keys_with_parent_and_tokens(sink: RecordingSink) -> None:
    bidx = _RecordingBytes()
    m = _bytes_mapper(sink, bidx)
    _apply(m, vllm_stored([100], None, T32[:16]))
    _apply(m, vllm_stored([200], 100, T32[16:]))
    k0, k1 = fp.chain_keys(T32, 16)
    assert bidx.heard == [
        ("stored", SCOPE, "r1", None, [k0], T32[:16]),
        ("stored", SCOPE, "r1", fp.key_int(k0), [k1], T32[16:]),
    ]
    # the very key objects the index got
    assert bidx.heard[0][4][0] is sink.stored()[0][3][0]
    assert bidx.chain() == {k0, k1}
    _apply(m, vllm_removed([200]))
    assert bidx.heard[-1] == ("removed", SCOPE, "r1", [k1])
    assert bidx.chain() == {k0}
    _apply(m, CLEARED)
    assert bidx.holds(SCOPE, "r1") == 0 and bidx.entries == 0


def test_bytes_sink_salted_chain_starts_at_the_salt_root(sink: RecordingSink) -> None:
    bidx = _RecordingBytes()
    m = _bytes_mapper(sink, bidx)
    _apply(m, vllm_stored([1, 2], None, T32, extra_keys=[["tenant-salt"], []]))
    ((_, _, _, parent, keys, tokens),) = bidx.heard
    assert parent == fp.salt_root("tenant-salt")
    assert keys == fp.chain_keys(T32, 16, salt="tenant-salt") and tokens == T32


def test_bytes_sink_two_ranks_clear_only_when_no_rank_holds(sink: RecordingSink) -> None:
    bidx = _RecordingBytes()
    m = _bytes_mapper(sink, bidx)
    _apply(m, vllm_stored([10, 11], None, T32), rank=0)
    _apply(m, vllm_stored([20, 21], None, T32), rank=1)
    k0, k1 = fp.chain_keys(T32, 16)
    _apply(m, CLEARED, rank=1)
    assert bidx.chain() == {k0, k1}  # rank 0 still holds both
    _apply(m, vllm_removed([11]), rank=0)
    assert bidx.chain() == {k0}
    m.drop_rank(0)
    assert bidx.chain() == set() and bidx.entries == 0


def test_bytes_sink_sglang_pages_carry_the_whole_block_tokens(sink: RecordingSink) -> None:
    bidx = _RecordingBytes(block_size=4)
    m = _bytes_mapper(sink, bidx, engine="sglang", block_size=4)
    for ev in _sglang_pages(list(range(1, 11))):
        _apply(m, ev, engine="sglang")
    k0, k1 = fp.chain_keys(list(range(1, 9)), 4)
    assert [h[3:] for h in bidx.heard] == [
        (None, [k0], [1, 2, 3, 4]),
        (fp.key_int(k0), [k1], [5, 6, 7, 8]),
    ]
    _apply(m, sglang_removed([1005]), engine="sglang")  # a middle page of block 2
    assert bidx.chain() == {k0}


def test_bytes_sink_hears_a_store_before_the_index_can_evict_it() -> None:
    """The index's cap evicts on the write that stores; the byte chain follows it."""
    index = Index(IndexSettings(max_entries=1))
    bidx = _RecordingBytes()
    index.add_eviction_listener(bidx.blocks_removed)
    m = Mapper(
        EndpointConfig(replica_id="r1", model="m1", kv_events="tcp://x:1", tenant="t1"),
        index,
        bytes_sink=bidx,
    )
    _apply(m, vllm_stored([1, 2], None, T32))
    assert index.total_entries == 1
    assert bidx.entries == 1 and bidx.heard[-1][0] == "removed"


def test_ingest_leaves_nothing_for_the_cyclic_gc_to_walk() -> None:
    """An engine's blocks live as ints and bytes in untracked dicts (mapper nodes and refs,
    the index, the byte chain): a full collection must not grow with the blocks held (a
    ``_Node`` object per block made it cost ~85 ms at 200k blocks, inline in a request)."""
    index = Index(IndexSettings(), clock=lambda: 1.0)
    table = ByteTable(tuple(bytes([i]) for i in range(256)), True)
    blocks = ByteIndex(table, 16)
    mappers = [
        Mapper(EndpointConfig(f"r{i}", "m1", "tcp://x:1", tenant="t1"), index, bytes_sink=blocks)
        for i in range(2)
    ]

    def ingest() -> list[Mapper]:
        for chain in range(40):
            tokens = [(chain * 7 + t) % 250 + 1 for t in range(50 * 16)]
            hashes = [chain * 1000 + b for b in range(50)]
            _apply(mappers[chain % 2], vllm_stored(hashes, None, tokens))
        # half of them evicted again, as an engine does
        for chain in range(0, 40, 2):
            _apply(mappers[0], vllm_removed([chain * 1000 + b for b in range(25, 50)]))
        return mappers

    growth = gc_checks.tracked_growth(ingest)
    assert index.distinct_prefixes == 2000 - 500
    assert blocks.entries == 2000 - 500
    assert growth < 50, f"{growth} GC-tracked objects kept for 1,500 blocks"
    walked = gc_checks.large_tracked_containers([index, blocks, *mappers])
    assert not walked, f"GC-tracked containers a collection walks item by item: {walked}"


def test_byte_jumps_fed_by_vllm_events_match_as_stepping_and_as_tokens() -> None:
    """End to end with a real tokenizer: vLLM events of two conversations sharing a prefix
    (the second only its new blocks after the shared one, as vLLM publishes them), mapped
    into the index and into byte chains with and without jumps; the walks give the same
    match, and the index's per-replica matches over it are the token path's, also after
    the engine evicted a tail; a clear leaves no jump behind."""
    tok = Tokenizer.from_file(
        str(Path(__file__).resolve().parents[2] / "data" / "tiny-tokenizer" / "tokenizer.json")
    )
    table = ByteTable.of(tok)
    bs = 4
    index = Index(IndexSettings(), clock=lambda: 1.0)
    jumping, stepping = ByteIndex(table, bs, jump_blocks=3), ByteIndex(table, bs, jump_blocks=0)
    config = EndpointConfig(replica_id="r1", model="m1", kv_events="tcp://x:1", tenant="t1", block_size=bs)
    mappers = [
        Mapper(config, index, bytes_sink=jumping),
        Mapper(config, RecordingSink(), bytes_sink=stepping),
    ]
    shared = "hello world, the quick brown fox jumps over the lazy dog and"
    one = tok.encode(shared + " runs far away from here", add_special_tokens=False).ids
    two = tok.encode(shared + " sleeps in the warm sun all day", add_special_tokens=False).ids
    n1, n2 = len(one) // bs, len(two) // bs
    common = next(i for i in range(min(n1, n2)) if one[i * bs : (i + 1) * bs] != two[i * bs : (i + 1) * bs])
    assert common >= 6
    events = [
        vllm_stored(list(range(1, n1 + 1)), None, one[: n1 * bs], block_size=bs),
        vllm_stored(list(range(101, 101 + n2 - common)), common, two[common * bs : n2 * bs], block_size=bs),
    ]
    for m in mappers:
        for ev in events:
            _apply(m, ev)
    with jumping.reading(SCOPE) as chain:
        assert len(chain.jumps) >= 3

    def check(request: str) -> None:
        data = request.encode()
        jump = bytematch.ByteMatcher(tok, jumping).match(SCOPE, data)
        assert jump == bytematch.ByteMatcher(tok, stepping).match(SCOPE, data)
        token_keys = fp.chain_keys(tok.encode(request, add_special_tokens=False).ids, bs)
        assert jump.blocks and index.longest_prefix(SCOPE, jump.keys) == index.longest_prefix(
            SCOPE, token_keys
        )

    for request in (shared + " sleeps in the warm sun", shared + " runs far away", shared + " x"):
        check(request)
    for m in mappers:  # the engine evicts the first conversation's tail
        _apply(m, vllm_removed(list(range(common + 2, n1 + 1))))
    check(shared + " runs far away from here again")
    for m in mappers:
        _apply(m, CLEARED)
    assert jumping.entries == 0 and jumping.approx_bytes() == 0
    with jumping.reading(SCOPE) as chain:
        assert not chain.jumps
