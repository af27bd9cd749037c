"""``index.bytekeys``: the token id -> bytes table (which models are byte-recoverable) and
the auxiliary byte-chain index fed from stored blocks."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import xxhash
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from inference_cache.index import bytekeys, fingerprint
from inference_cache.index.types import Scope

REPO = Path(__file__).resolve().parents[2]
QWEN = REPO / ".cache" / "tokenizers" / "qwen" / "tokenizer.json"
TINY = REPO / "tests" / "data" / "tiny-tokenizer" / "tokenizer.json"
SCOPE = Scope("t", "m", "vllm", "")
#: The aux key of b"hello" at the root (pinned: a change re-keys every aux entry).
EDGE_OF_HELLO = 15916993665974071258
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "naïve café"] * 20


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    if not QWEN.exists():
        pytest.skip("the Qwen tokenizer is built by `make tokenizer`")
    return Tokenizer.from_file(str(QWEN))


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_file(str(TINY))


def test_qwen_is_byte_recoverable(qwen: Tokenizer) -> None:
    table = bytekeys.ByteTable.of(qwen)
    assert table.recoverable, table.reason
    text = "Ünïcödé 你好 🎉 <|im_start|>user\n  def f():\n\treturn 1<|im_end|>"
    ids = qwen.encode(text, add_special_tokens=False).ids
    assert table.join(ids) == text.encode()
    assert table.pieces[qwen.token_to_id("<|im_end|>")] == b"<|im_end|>"
    # a token holding part of a UTF-8 character: its raw bytes, not text
    hieroglyph = qwen.encode("𓀀", add_special_tokens=False).ids
    assert len(hieroglyph) == 3
    assert [table.pieces[i] for i in hieroglyph] == [b"\xf0\x93", b"\x80", b"\x80"]


def test_tiny_tokenizer_is_byte_recoverable(tiny: Tokenizer) -> None:
    table = bytekeys.ByteTable.of(tiny)
    assert table.recoverable, table.reason
    assert table.join(tiny.encode("hello world", add_special_tokens=False).ids) == b"hello world"


def test_sentencepiece_style_tokenizer_is_not_byte_recoverable() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    table = bytekeys.ByteTable.of(tok)
    assert not table.recoverable
    assert "Metaspace" in table.reason


def test_byte_level_decoder_without_byte_level_vocab_fails_the_self_check() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces: bytes lost
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    table = bytekeys.ByteTable.of(tok)
    assert not table.recoverable
    assert table.reason.startswith("self-check failed")


def test_edge_key_is_pinned() -> None:
    # The byte-chain definition (module docstring); a change re-keys every aux entry.
    assert bytekeys.content_hash(b"hello") == bytekeys.content_hash(memoryview(b"xhello")[1:])
    content = xxhash.xxh3_64_intdigest(b"hello", seed=7331)
    parent = fingerprint.salt_root("s")
    node = fingerprint.key_bytes(parent)
    want = xxhash.xxh3_64_intdigest(node + struct.pack("<Q", content), seed=7331)
    assert bytekeys.edge_key(node, bytekeys.content_hash(b"hello")) == want
    assert bytekeys.edge_key(bytekeys.ROOT, content) == EDGE_OF_HELLO


def _blocks(tok: Tokenizer, text: str, bs: int, salt: str | None = None) -> tuple[list[bytes], list[int]]:
    ids = tok.encode(text, add_special_tokens=False).ids
    keys = fingerprint.chain_keys(ids, bs, salt=salt)
    return keys, ids[: len(keys) * bs]


def test_index_refcounts_replicas_and_undoes_removals(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 4)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over the lazy dog again", 4)
    assert len(keys) >= 3
    idx.blocks_stored(SCOPE, "a", None, keys, ids)
    idx.blocks_stored(SCOPE, "a", None, keys, ids)  # a refresh adds nothing
    idx.blocks_stored(SCOPE, "b", None, keys[:2], ids[:8])
    assert idx.entries == len(keys) + 2
    assert (idx.holds(SCOPE, "a"), idx.holds(SCOPE, "b")) == (len(keys), 2)
    first = tiny.decode(ids[:4]).encode()
    with idx.reading(SCOPE) as chain:
        assert bytekeys.child_lengths(chain.children[bytekeys.ROOT]) == [len(first)]
        edge = bytekeys.edge_key(bytekeys.ROOT, bytekeys.content_hash(first))
        assert chain.edges[edge] == keys[0]
        assert chain.last_token_bytes(keys[0]) == len(tiny.decode(ids[3:4]).encode())
    idx.blocks_removed(SCOPE, "a", keys)
    assert idx.entries == 2 and idx.holds(SCOPE, "a") == 0
    idx.replica_cleared("b", model="m", tenant="t")
    assert idx.entries == 0
    with idx.reading(SCOPE) as chain:
        assert not chain.children and not chain.edges and not chain.jumps


def test_salted_chain_starts_at_the_salt_root(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 4)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox", 4, salt="s")
    idx.blocks_stored(SCOPE, "a", fingerprint.salt_root("s"), keys, ids)
    with idx.reading(SCOPE) as chain:
        assert fingerprint.key_bytes(fingerprint.salt_root("s")) in chain.children
        assert bytekeys.ROOT not in chain.children


def test_unknown_token_ids_and_bad_lengths_are_not_indexed(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2)
    keys = fingerprint.chain_keys([1, 2, 3, 10**6], 2)
    idx.blocks_stored(SCOPE, "a", None, keys, [1, 2, 3, 10**6])
    assert (idx.entries, idx.unmapped_blocks) == (1, 1)
    idx.blocks_stored(SCOPE, "a", None, keys, [1, 2, 3])  # not blocks x block size
    assert idx.entries == 1
    with pytest.raises(ValueError, match="block_size"):
        bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 0)


def test_non_recoverable_model_indexes_nothing() -> None:
    table = bytekeys.ByteTable((b"a", b"b"), False, "decoder Metaspace is not ByteLevel")
    idx = bytekeys.ByteIndex(table, 1)
    idx.blocks_stored(SCOPE, "a", None, fingerprint.chain_keys([0, 1], 1), [0, 1])
    assert idx.entries == 0


def test_children_of_several_lengths_and_back(tiny: Tokenizer) -> None:
    table = bytekeys.ByteTable.of(tiny)
    idx = bytekeys.ByteIndex(table, 2)
    runs = ([1, 2, 3, 4], [5, 6], [400, 401])
    for replica, ids in zip("aab", runs, strict=True):
        idx.blocks_stored(SCOPE, replica, None, fingerprint.chain_keys(ids, 2), ids)

    def size(ids: list[int]) -> int:
        data = table.join(ids)
        assert data is not None
        return len(data)

    with idx.reading(SCOPE) as chain:
        want = sorted({size([1, 2]), size([5, 6]), size([400, 401])})
        assert len(want) == 3 and bytekeys.child_lengths(chain.children[bytekeys.ROOT]) == want
    idx.blocks_removed(SCOPE, "a", fingerprint.chain_keys([5, 6], 2))
    idx.replica_cleared("b", model="m", tenant="t")
    with idx.reading(SCOPE) as chain:
        assert bytekeys.child_lengths(chain.children[bytekeys.ROOT]) == [size([1, 2])]
        assert isinstance(chain.children[bytekeys.ROOT], int)  # back to the packed form
    assert idx.entries == 2


def test_same_bytes_other_tokens_is_a_conflict_not_an_edge(tiny: Tokenizer) -> None:
    """Two splits of the same bytes after the same parent (a client's token ids, decode
    output) share one edge: the first keeps it, the other is not indexed (bytes would
    otherwise claim tokens the request will not have)."""
    table = bytekeys.ByteTable.of(tiny)
    vocab = tiny.get_vocab(with_added_tokens=False)
    pairs = sorted(t for t in vocab if len(t) == 2)
    xy, yz = next((a, b) for a in pairs for b in pairs if a[1] == b[0] and a[0] in vocab and b[1] in vocab)
    left, right = [vocab[xy], vocab[yz[1]]], [vocab[xy[0]], vocab[yz]]
    assert table.join(left) == table.join(right)
    idx = bytekeys.ByteIndex(table, 2)
    idx.blocks_stored(SCOPE, "a", None, fingerprint.chain_keys(left, 2), left)
    idx.blocks_stored(SCOPE, "b", None, fingerprint.chain_keys(right, 2), right)
    assert (idx.entries, idx.conflicts, idx.holds(SCOPE, "b")) == (1, 1, 0)


def test_bytes_per_token_is_learned_from_new_blocks(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 4)
    assert idx.bytes_per_token == bytekeys.DEFAULT_BYTES_PER_TOKEN  # nothing stored yet
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over the lazy dog again", 4)
    idx.blocks_stored(SCOPE, "a", None, keys, ids)
    stored = len(tiny.decode(ids).encode())
    assert idx.bytes_per_token == pytest.approx(stored / len(ids))
    idx.blocks_stored(SCOPE, "b", None, keys, ids)  # the same blocks elsewhere: no new bytes
    assert idx.bytes_per_token == pytest.approx(stored / len(ids))


# -- jumps -------------------------------------------------------------------------------------


def _span(tiny: Tokenizer, ids: list[int]) -> bytes:
    data = bytekeys.ByteTable.of(tiny).join(ids)
    assert data is not None
    return data


def test_a_run_of_blocks_gets_one_jump_per_full_span(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2, jump_blocks=3)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over the lazy dog again", 2)
    assert len(keys) >= 7
    idx.blocks_stored(SCOPE, "a", None, keys[:7], ids[:14])
    with idx.reading(SCOPE) as chain:
        assert chain.layout is not None and chain.layout.blocks == 3
        assert set(chain.jumps) == {bytekeys.ROOT, keys[2]}  # blocks 0-2 and 3-5; 6 is alone
        jump = chain.jumps[keys[2]]
        span = _span(tiny, ids[6:12])
        assert jump[bytekeys.JUMP_KEYS :] == tuple(keys[3:6])
        assert all(a is b for a, b in zip(jump[bytekeys.JUMP_KEYS :], keys[3:6], strict=True))  # shared
        assert (jump[bytekeys.JUMP_DIGEST], jump[bytekeys.JUMP_SPAN]) == (
            xxhash.xxh3_64_intdigest(span, bytekeys.JUMP_SEED),
            len(span),
        )
        ends = struct.unpack("<3I", jump[bytekeys.JUMP_ENDS])  # type: ignore[arg-type]
        assert ends == tuple(len(_span(tiny, ids[6 : 6 + 2 * k])) for k in (1, 2, 3))
    plain = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2, jump_blocks=0)
    plain.blocks_stored(SCOPE, "a", None, keys[:7], ids[:14])
    extra = idx.approx_bytes() - plain.approx_bytes()
    assert 2 * 150 < extra < 2 * 150 + 400  # two jumps of ~180 bytes, and the jumps dict


def test_a_jump_lives_as_long_as_its_first_block(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2, jump_blocks=2)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over", 2)
    idx.blocks_stored(SCOPE, "a", None, keys[:4], ids[:8])
    idx.blocks_stored(SCOPE, "b", None, keys[:4], ids[:8])
    with idx.reading(SCOPE) as chain:
        assert set(chain.jumps) == {bytekeys.ROOT, keys[1]}
    idx.blocks_removed(SCOPE, "a", [keys[0], keys[3]])
    idx.blocks_removed(SCOPE, "b", [keys[3]])  # the second jump's last block: it stays
    with idx.reading(SCOPE) as chain:
        assert set(chain.jumps) == {bytekeys.ROOT, keys[1]}
    idx.blocks_removed(SCOPE, "b", [keys[0], keys[2]])  # ``a`` still holds block 2
    with idx.reading(SCOPE) as chain:
        assert set(chain.jumps) == {keys[1]}
    equal = keys[2][:4] + keys[2][4:]  # an equal key, not the stored object (as events give)
    assert equal is not keys[2]
    idx.blocks_removed(SCOPE, "a", [equal])  # no replica left
    with idx.reading(SCOPE) as chain:
        assert not chain.jumps
    idx.replica_cleared("a", model="m", tenant="t")
    idx.replica_cleared("b", model="m", tenant="t")
    assert idx.entries == 0


def test_a_later_run_from_the_same_node_replaces_its_jump(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2, jump_blocks=2)
    one, ids_one = _blocks(tiny, "hello world, the quick brown fox", 2)
    two, ids_two = _blocks(tiny, "naïve café, the lazy dog sleeps", 2)
    idx.blocks_stored(SCOPE, "a", None, one[:2], ids_one[:4])
    idx.blocks_stored(SCOPE, "a", None, two[:2], ids_two[:4])
    with idx.reading(SCOPE) as chain:
        assert chain.jumps[bytekeys.ROOT][bytekeys.JUMP_KEYS :] == tuple(two[:2])
    idx.blocks_removed(SCOPE, "a", one[:1])  # not the jump's first block: the jump stays
    with idx.reading(SCOPE) as chain:
        assert bytekeys.ROOT in chain.jumps
    idx.blocks_removed(SCOPE, "a", two[:1])
    with idx.reading(SCOPE) as chain:
        assert not chain.jumps


def test_a_block_already_held_starts_a_new_span(tiny: Tokenizer) -> None:
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2, jump_blocks=2)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over", 2)
    idx.blocks_stored(SCOPE, "a", None, keys[1:2], ids[2:4])  # parent unknown here: any node
    idx.blocks_stored(SCOPE, "a", None, keys[:5], ids[:10])
    with idx.reading(SCOPE) as chain:
        assert set(chain.jumps) == {keys[1]}  # block 0 alone, 1 held, then 2-3; 4 alone


def test_jumps_can_be_turned_off_and_need_two_blocks(tiny: Tokenizer) -> None:
    table = bytekeys.ByteTable.of(tiny)
    idx = bytekeys.ByteIndex(table, 2, jump_blocks=0)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over", 2)
    idx.blocks_stored(SCOPE, "a", None, keys, ids)
    with idx.reading(SCOPE) as chain:
        assert chain.layout is None and not chain.jumps
    for bad in (1, -1):
        with pytest.raises(ValueError, match="jump_blocks"):
            bytekeys.ByteIndex(table, 2, jump_blocks=bad)


def test_no_jump_whose_first_block_sits_under_another_parent(tiny: Tokenizer) -> None:
    """Block 1 stored first as a fresh chain (parent unknown): a later run from block 0
    starting with it gets no jump, which removing block 1 (looked up under its stored
    parent) could not find, and which would outlive it."""
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 2, jump_blocks=2)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over", 2)
    idx.blocks_stored(SCOPE, "a", None, keys[1:2], ids[2:4])
    idx.blocks_stored(SCOPE, "b", fingerprint.key_int(keys[0]), keys[1:5], ids[2:10])
    with idx.reading(SCOPE) as chain:
        assert set(chain.jumps) == {keys[2]}  # blocks 3-4; not 1-2
    idx.blocks_removed(SCOPE, "a", keys[1:2])
    idx.blocks_removed(SCOPE, "b", keys[1:3])
    with idx.reading(SCOPE) as chain:
        assert set(chain.jumps) == {keys[2]} and keys[1] not in chain.blocks


def test_forks_are_marked_in_the_jumps_over_them(tiny: Tokenizer) -> None:
    """A node gaining a child of another length sets its bit in the jump it starts and in
    the jumps of its ancestors that pass it (``JUMP_FORKS``), whichever came first."""
    table = bytekeys.ByteTable.of(tiny)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over", 1)
    other = [*ids[:3], *tiny.encode(" zzzz", add_special_tokens=False).ids]
    assert len(table.join(other[3:4]) or b"") != len(table.join(ids[3:4]) or b"")
    for order in ((ids, other), (other, ids)):
        idx = bytekeys.ByteIndex(table, 1, jump_blocks=4)
        for replica, run in zip("ab", order, strict=True):
            idx.blocks_stored(SCOPE, replica, None, fingerprint.chain_keys(run, 1), run)
        with idx.reading(SCOPE) as chain:  # node 2 (after block 2) has two children
            assert chain.jumps[bytekeys.ROOT][bytekeys.JUMP_FORKS] == 0b1000
            assert isinstance(chain.children[keys[2]], bytes)


def test_nothing_is_left_once_every_block_is_gone(tiny: Tokenizer) -> None:
    """Random runs (shared prefixes, two scopes, salted, mid-chain, replicas re-storing),
    then removals in random order and clears: no jump, node, edge or scope outlives its
    blocks; the memory estimate counts scopes and replicas, not blocks."""
    table = bytekeys.ByteTable.of(tiny)
    r = random.Random(5)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "hello",
        "world",
        "jumps",
        "over",
        "lazy",
        "dog",
        "helpful",
        "naïve",
        "café",
    ]
    for _trial in range(40):
        idx = bytekeys.ByteIndex(table, r.randint(1, 3), jump_blocks=r.randint(2, 4))
        stored: list[tuple[Scope, str, list[bytes]]] = []
        base = " ".join(r.choice(words) for _ in range(12))
        for _ in range(8):
            text = base[: r.randint(0, len(base))] + " ".join(r.choice(words) for _ in range(r.randint(1, 8)))
            salt = r.choice((None, "s"))
            keys, ids = _blocks(tiny, text, idx.block_size, salt=salt)
            start = r.randint(0, len(keys) // 2)
            parent = (
                fingerprint.key_int(keys[start - 1])
                if start
                else fingerprint.salt_root(salt)
                if salt
                else None
            )
            scope = r.choice((SCOPE, Scope("t", "m", "vllm", "lora")))
            replica = r.choice("abc")
            idx.blocks_stored(scope, replica, parent, keys[start:], ids[start * idx.block_size :])
            stored.append((scope, replica, keys[start:]))
        assert idx.entries and idx.approx_bytes() > 0
        r.shuffle(stored)
        for scope, replica, keys in stored[: len(stored) // 2]:
            idx.blocks_removed(scope, replica, r.sample(keys, len(keys)))
        for replica in "abc":
            idx.replica_cleared(replica, model="m", tenant="t")
        assert (idx.entries, idx.approx_bytes()) == (0, 0)
        for scope in (SCOPE, Scope("t", "m", "vllm", "lora")):
            with idx.reading(scope) as chain:
                assert not (chain.jumps or chain.children or chain.edges or chain.blocks)


def test_a_partly_removed_store_leaves_no_jump(tiny: Tokenizer) -> None:
    """Removing every block by keys (no clear) empties the jumps too."""
    idx = bytekeys.ByteIndex(bytekeys.ByteTable.of(tiny), 1, jump_blocks=2)
    keys, ids = _blocks(tiny, "hello world, the quick brown fox jumps over the lazy dog", 1)
    idx.blocks_stored(SCOPE, "a", None, keys, ids)
    idx.blocks_stored(SCOPE, "b", None, keys[:5], ids[:5])
    with idx.reading(SCOPE) as chain:
        assert len(chain.jumps) == len(keys) // 2
    idx.blocks_removed(SCOPE, "a", keys[::-1])  # tail first
    idx.blocks_removed(SCOPE, "b", keys[:5])
    assert (idx.entries, idx.approx_bytes()) == (0, 0)
