"""Token ids -> the exact bytes of the prompt, and the auxiliary byte-chain keys (issue #9).

Owner: ``inference_cache.index``. Two pieces, both off the request path:

* ``ByteTable`` (one per model, built once from its ``tokenizers.Tokenizer``): the bytes
  each token id stands for. Byte-level BPE (Qwen, Llama 3, GPT-OSS, DeepSeek) maps every
  vocabulary string back through the inverse of GPT-2's ``bytes_to_unicode``; added and
  special tokens are their literal text. A model is byte-recoverable only when its
  decoder is ``ByteLevel`` and a self-check passes: for built-in samples (ASCII, CJK,
  emoji, code, whitespace runs, every added token) the concatenated bytes of
  ``encode(text)`` equal the normalised text byte for byte. SentencePiece (``Metaspace``
  decoders, ``▁`` and ``<0xNN>`` byte fallback) is marked not byte-recoverable: its
  prepended ``▁`` makes the request bytes depend on where the text was cut.
* ``ByteIndex`` (one per model): fed from the same ``BlockStored`` information as the
  ``Index`` (each block's token ids, its parent's prefix hash and its own key from
  ``index.fingerprint``). Per block it stores an auxiliary edge
  ``edge = XXH3_64(BYTE_SEED, parent key ++ le_u64(XXH3_64(BYTE_SEED, block bytes)))``
  (``parent key``: the 8-byte token-chain key before the block, zeros for a fresh chain)
  -> the block's token-chain key, and per node (a token-chain key, or the chain's root)
  the byte lengths of its children and the byte length of its final token, so the request-side walk
  (``index.bytematch``) knows which slice lengths to hash. The walk turns request bytes
  into the token-chain keys the ``Index`` already holds; ``Index.longest_prefix`` then
  does per-replica runs, freshness and TTL exactly as on the token path. These entries
  are auxiliary: never counted in the index's entry caps or quotas, never in
  ``/snapshot``; ``approx_bytes`` reports their memory separately.

Jumps (request-path speed): stepping the walk costs two dict probes per block, most of
them cache misses once the chain is large (0.5 ms for an 8k-token follow-up among 200
cached conversations). So each run of ``jump_blocks`` consecutive blocks stored in one
call also gets a jump keyed by the node before it: ``XXH3_64(JUMP_SEED, the run's bytes)``,
their total length, each block's end offset and key, in one tuple (``Jumps``). The
walk tries a node's jump first: one hash over the whole span and, when it matches, every
key of the span at once; otherwise it steps. A jump names the blocks of one stored path
whose bytes the request starts with, i.e. what stepping would find along that path where
each node has children of one byte length. Where a node on the path has children of
several lengths (a *fork*: another stored branch, e.g. the next turn of another
conversation) stepping may pick another child whose bytes the request also starts with
(the one ending on a request token boundary), so the jump records its forks (a bitmask by
position, set when the jump is packed and when a node of its path becomes a fork later:
``_mark_fork`` looks at the jumps of the node's ``jump_blocks - 1`` ancestors), and the
walk takes a jump with forks only where stepping would pick the jump's child at each of
them (without this, the walk under-claimed: a jump through the wrong branch failed the
boundary check and dropped back to the fork). A jump lives as long as its first block (a
later run from the same node replaces it); a block of its span removed earlier leaves a
key the ``Index`` no longer holds for any replica, which ``Index.longest_prefix`` then
stops at, as it does for any key it lacks.

Everything is keyed per ``Scope`` and refcounted per replica, so ``blocks_removed`` and
``replica_cleared`` undo exactly what a replica stored. Two token sequences with the same
bytes after the same parent (a client's own token ids, or decode output that is not the
tokenizer's canonical split) share an edge: the first keeps it, the other is not indexed
(``conflicts``; bytes then under-claim it, never over-claim).
"""

from __future__ import annotations

import struct
import sys
import threading
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from itertools import accumulate

import xxhash
from tokenizers import Tokenizer

from inference_cache.index import fingerprint
from inference_cache.index.types import Scope

#: Seed of the byte-chain hashes (distinct from the token fingerprint's 1337).
BYTE_SEED = 7331
#: Seed of a jump's span digest.
JUMP_SEED = BYTE_SEED ^ 2
#: Blocks one jump spans (``ByteIndex(jump_blocks=...)``; 0: no jumps).
JUMP_BLOCKS = 16
#: The parent node of a fresh, unsalted chain (a salted chain starts at its salt root's key).
ROOT = bytes(8)
_le = struct.Struct("<Q")
_xxh = xxhash.xxh3_64_intdigest
_U64 = (1 << 64) - 1

#: Self-check texts: what a prompt holds (the added tokens are appended per model).
SELF_CHECK_SAMPLES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。日本語のテキストと한국어 문장도 있습니다。",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷 with café naïve Ångström",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\r\n",
    "   leading spaces, trailing spaces   \n\n\n  \t mixed\u00a0nbsp",
    '{"key": [1, 2.5e-3, null], "path": "C:\\\\tmp\\\\x"}',
)


@cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (what ``ByteLevel`` maps bytes to)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


def edge_key(parent: bytes, content: int) -> int:
    """The byte-chain key of a block whose bytes hash to ``content`` after node ``parent``
    (an 8-byte token-chain key)."""
    return _xxh(parent + _le.pack(content), BYTE_SEED)


def content_hash(data: bytes | memoryview) -> int:
    return _xxh(data, BYTE_SEED)


@dataclass(frozen=True)
class ByteTable:
    """A model's token id -> bytes map, and whether request bytes can stand for its tokens."""

    #: ``pieces[id]``: the bytes of token ``id`` (``None``: not recoverable, e.g. a gap).
    pieces: tuple[bytes | None, ...]
    #: Byte matching is exact for this model (decoder supported and the self-check passed).
    recoverable: bool
    #: Why not (empty when recoverable), for the once-logged notice and ``/metrics``.
    reason: str = ""

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ByteTable:
        """Build the table and run the self-check (a few ms; once per model at start-up)."""
        decoder = type(tokenizer.decoder).__name__ if tokenizer.decoder is not None else None
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        pieces: list[bytes | None] = [None] * size
        added = tokenizer.get_added_tokens_decoder()
        if decoder != "ByteLevel":
            return cls(tuple(pieces), False, f"decoder {decoder or 'none'} is not ByteLevel")
        inverse = _unicode_to_byte()
        latin1 = {ord(c): b for c, b in inverse.items()}
        for text, i in tokenizer.get_vocab(with_added_tokens=False).items():
            if i < size and inverse.keys() >= set(text):
                pieces[i] = text.translate(latin1).encode("latin-1")
        for i, tok in added.items():
            if i < size:
                pieces[i] = tok.content.encode("utf-8")
        table = cls(tuple(pieces), True)
        bad = table.self_check(tokenizer, [t.content for t in added.values() if t.content])
        return table if bad is None else cls(table.pieces, False, bad)

    def self_check(self, tokenizer: Tokenizer, specials: Sequence[str] = ()) -> str | None:
        """``None`` when every sample's token bytes equal its normalised text, else why not."""
        samples = [*SELF_CHECK_SAMPLES]
        if specials:
            samples.append("x" + " a ".join(specials) + "\ny" + "".join(specials))
        for text in samples:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            got = self.join(ids)
            want = normalize(tokenizer, text).encode("utf-8")
            if got != want:
                return f"self-check failed on {text[:24]!r}"
        return None

    def join(self, ids: Sequence[int]) -> bytes | None:
        """The bytes of ``ids`` (``None`` when one has no known bytes)."""
        try:  # a None piece (no known bytes) fails the join
            return b"".join(map(self.pieces.__getitem__, ids))  # type: ignore[arg-type]
        except (IndexError, TypeError):
            return None

    def length(self, token_id: int) -> int:
        piece = self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None
        return -1 if piece is None else len(piece)


def normalize(tokenizer: Tokenizer, text: str) -> str:
    """The tokenizer's normalizer applied to ``text`` (identity without one). The Unicode
    forms go through ``unicodedata`` (its quick check makes an already normalised prompt
    ~50x cheaper than a round trip through ``tokenizers``)."""
    norm = tokenizer.normalizer
    if norm is None:
        return text
    form = type(norm).__name__
    if form in _FORMS:
        return text if unicodedata.is_normalized(form, text) else unicodedata.normalize(form, text)  # type: ignore[arg-type]
    return str(norm.normalize_str(text))


_FORMS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})


class _ScopeBytes:
    """The byte chain of one scope, shared by its replicas."""

    __slots__ = ("blocks", "children", "edges", "held", "jumps")

    def __init__(self) -> None:
        #: node (an 8-byte token-chain key, ``ROOT`` or a salt root's key) -> its children's
        #: byte lengths: ``length << 32 | edges`` for one length (the common case), else
        #: ``(length, edges)`` u32 pairs by length, packed in bytes (``child_lengths``).
        #: Every structure here holds only ints and bytes, so the cyclic GC never tracks
        #: (and never walks) them, whatever their size: see ``mapper._pack``.
        self.children: dict[bytes, int | bytes] = {}
        #: byte edge key -> the token-chain key of the block it stands for.
        self.edges: dict[int, bytes] = {}
        #: token-chain key -> ``edge | parent << 64 | length << 128 | last << 160 | holders << 176``
        #: (``last``: byte length of the block's final token; ``holders``: replicas).
        self.blocks: dict[bytes, int] = {}
        #: replica -> the token-chain keys it holds here (a dict as a set: a set is
        #: always GC-tracked).
        self.held: dict[str, dict[bytes, None]] = {}
        #: node -> the jump over the ``jump_blocks`` blocks stored after it (``Jumps``).
        self.jumps: dict[bytes, tuple[int | bytes, ...]] = {}


class Jumps:
    """The layout of one scope's jumps over ``n`` blocks: a tuple ``(span digest, span
    length, the blocks' end offsets within the span packed as u32, forks, the n block
    keys)``; bit ``p`` of ``forks`` is set when the node before block ``p`` (the jump's
    node for ``p == 0``) has children of several byte lengths (module docstring).
    The keys are the index's own objects (so ``Index.longest_prefix`` finds them by
    identity); a tuple of ints and bytes leaves the GC's tracking at its first collection."""

    __slots__ = ("blocks", "ends")

    def __init__(self, n: int) -> None:
        self.blocks = n
        self.ends = struct.Struct(f"<{n}I")

    def pack(self, keys: Sequence[bytes], pieces: Sequence[bytes], forks: int) -> tuple[int | bytes, ...]:
        span = b"".join(pieces)
        ends = self.ends.pack(*accumulate(map(len, pieces)))
        return (_xxh(span, JUMP_SEED), len(span), ends, forks, *keys)


#: A jump's fields (``Jumps``).
JUMP_DIGEST, JUMP_SPAN, JUMP_ENDS, JUMP_FORKS, JUMP_KEYS = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class ChainView:
    """Read access to one scope's byte chain (valid only inside ``ByteIndex.reading``)."""

    children: Mapping[bytes, int | bytes]
    edges: Mapping[int, bytes]
    blocks: Mapping[bytes, int]
    jumps: Mapping[bytes, tuple[int | bytes, ...]]
    #: Their packing (``None``: jumps off).
    layout: Jumps | None

    def last_token_bytes(self, key: bytes) -> int:
        """Byte length of the final token of block ``key`` (-1: unknown)."""
        packed = self.blocks.get(key)
        return -1 if packed is None else (packed >> _LAST_SHIFT) & _U16


_EMPTY = ChainView({}, {}, {}, {}, None)
_PACKED_BYTES = sys.getsizeof(1 << 200)
_INT_BYTES = sys.getsizeof(1 << 63)
_LEN_SHIFT, _LAST_SHIFT, _HOLD_SHIFT = 128, 160, 176
_U16, _U32 = (1 << 16) - 1, (1 << 32) - 1


#: ``ByteIndex.bytes_per_token`` before any block was stored (English text with a
#: byte-level BPE runs about 4 bytes per token).
DEFAULT_BYTES_PER_TOKEN = 4.0
#: Tokens of new blocks over which ``bytes_per_token`` averages (then halves its sums).
_RATIO_WINDOW = 1 << 20


class ByteIndex:
    """Auxiliary byte-chain keys of one model's cached blocks. Thread-safe (one lock)."""

    def __init__(self, table: ByteTable, block_size: int, *, jump_blocks: int = JUMP_BLOCKS) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if jump_blocks < 0 or jump_blocks == 1:
            raise ValueError(f"jump_blocks must be 0 (off) or at least 2, got {jump_blocks}")
        self.table = table
        self.block_size = block_size
        self._jumps = Jumps(jump_blocks) if jump_blocks else None
        self._lock = threading.Lock()
        self._scopes: dict[Scope, _ScopeBytes] = {}
        #: Replica x block entries held (the auxiliary count, never the index's cap unit).
        self.entries = 0
        #: Blocks not indexed because a token id has no known bytes.
        self.unmapped_blocks = 0
        #: Blocks not indexed because other tokens with the same bytes took their edge.
        self.conflicts = 0
        #: Bytes and tokens of the blocks stored lately (halved past ``_RATIO_WINDOW``
        #: tokens, so the ratio follows the traffic): ``bytes_per_token``.
        self._ratio_bytes = 0
        self._ratio_tokens = 0

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token of the blocks the engines stored lately (the estimate of a
        request's uncached rest when nothing of it matched); 4.0 before any block."""
        tokens = self._ratio_tokens
        return self._ratio_bytes / tokens if tokens else DEFAULT_BYTES_PER_TOKEN

    def blocks_stored(
        self,
        scope: Scope,
        replica_id: str,
        parent: int | None,
        keys: Sequence[bytes],
        token_ids: Sequence[int],
    ) -> None:
        """Blocks ``keys`` (our fingerprint keys, chained) of ``replica_id`` with their token
        ids (``block_size`` per key); ``parent`` is the prefix hash before ``keys[0]``
        (``None``: a fresh unsalted chain; a salted chain passes its salt root). Pass the
        very key objects given to the ``Index``: they are shared, not copied."""
        bs = self.block_size
        if not self.table.recoverable or len(token_ids) != len(keys) * bs:
            return
        node = ROOT if parent is None else fingerprint.key_bytes(parent)
        pieces = self.table.pieces
        with self._lock:
            sc = self._scopes.get(scope)
            if sc is None:
                sc = self._scopes[scope] = _ScopeBytes()
            held = sc.held.setdefault(replica_id, {})
            jumps = self._jumps
            span_keys: list[bytes] = []
            span_pieces: list[bytes] = []
            head, forks = node, 0
            for i, key in enumerate(keys):
                if key in held:
                    node = key
                    span_keys.clear()
                    span_pieces.clear()
                    continue
                block = token_ids[i * bs : (i + 1) * bs]
                data = self.table.join(block)
                if data is None:
                    self.unmapped_blocks += len(keys) - i
                    break
                packed = sc.blocks.get(key)
                if packed is None:
                    edge = edge_key(node, content_hash(data))
                    if sc.edges.setdefault(edge, key) != key:
                        self.conflicts += len(keys) - i
                        break
                    last = len(pieces[block[-1]] or b"")
                    packed = (
                        edge | fingerprint.key_int(node) << 64 | len(data) << _LEN_SHIFT | last << _LAST_SHIFT
                    )
                    if _add_length(sc.children, node, len(data)) and jumps is not None:
                        _mark_fork(sc, node, jumps.blocks)
                    self._ratio_bytes += len(data)
                    self._ratio_tokens += bs
                    if self._ratio_tokens > _RATIO_WINDOW:
                        self._ratio_bytes //= 2
                        self._ratio_tokens //= 2
                sc.blocks[key] = packed + (1 << _HOLD_SHIFT)
                held[key] = None
                self.entries += 1
                if jumps is not None:
                    if not span_keys:
                        head, forks = node, 0
                    if isinstance(sc.children.get(node), bytes):
                        forks |= 1 << len(span_keys)
                    span_keys.append(key)
                    span_pieces.append(data)
                    if len(span_keys) == jumps.blocks:
                        # only where ``_unref`` of its first block finds it (a block stored
                        # before under another parent would leave the jump behind)
                        if (sc.blocks[span_keys[0]] >> 64) & _U64 == fingerprint.key_int(head):
                            sc.jumps[head] = jumps.pack(span_keys, span_pieces, forks)
                        span_keys.clear()
                        span_pieces.clear()
                node = key
            if not held:
                del sc.held[replica_id]
                if not sc.held:
                    del self._scopes[scope]

    def blocks_removed(self, scope: Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        with self._lock:
            sc = self._scopes.get(scope)
            held = sc.held.get(replica_id) if sc is not None else None
            if sc is None or held is None:
                return
            for key in keys:
                if key in held:
                    del held[key]
                    self._unref(sc, key)
            self._prune(scope, sc, replica_id)

    def replica_cleared(self, replica_id: str, *, model: str, tenant: str) -> None:
        """Drop every block of the replica under ``(tenant, model)`` (all schemes, adapters)."""
        with self._lock:
            for scope, sc in list(self._scopes.items()):
                if scope.model != model or scope.tenant != tenant:
                    continue
                held = sc.held.get(replica_id)
                if held is None:
                    continue
                for key in held:
                    self._unref(sc, key)
                held.clear()
                self._prune(scope, sc, replica_id)

    def _unref(self, sc: _ScopeBytes, key: bytes) -> None:
        self.entries -= 1
        packed = sc.blocks[key] - (1 << _HOLD_SHIFT)
        if packed >> _HOLD_SHIFT:
            sc.blocks[key] = packed
            return
        del sc.blocks[key]
        edge = packed & _U64
        if sc.edges.get(edge) == key:
            del sc.edges[edge]
        parent = fingerprint.key_bytes((packed >> 64) & _U64)
        _drop_length(sc.children, parent, (packed >> _LEN_SHIFT) & _U32)
        jump = sc.jumps.get(parent)
        if jump is not None and jump[JUMP_KEYS] == key:
            del sc.jumps[parent]

    def _prune(self, scope: Scope, sc: _ScopeBytes, replica_id: str) -> None:
        if not sc.held.get(replica_id, True):
            del sc.held[replica_id]
        if not sc.held:
            del self._scopes[scope]

    @contextmanager
    def reading(self, scope: Scope) -> Iterator[ChainView]:
        """The scope's byte chain under the lock (keep the walk short: it blocks ingest)."""
        with self._lock:
            sc = self._scopes.get(scope)
            yield _EMPTY if sc is None else ChainView(sc.children, sc.edges, sc.blocks, sc.jumps, self._jumps)

    def approx_bytes(self) -> int:
        """Memory the byte chain holds beyond the index (its dict tables, the packed ints,
        the jumps, the replicas' key sets; the 8-byte keys themselves are the index's,
        shared). An
        estimate from ``sys.getsizeof`` of the containers: O(scopes + replicas)."""
        size = sys.getsizeof
        layout = self._jumps
        jump_bytes = 0
        if layout is not None:  # the tuple, its digest, span and ends (the keys are shared)
            jump_bytes = size((0,) * (JUMP_KEYS + layout.blocks)) + size(1 << 63) + size(1 << 20)
            jump_bytes += size(bytes(layout.ends.size))
        with self._lock:
            total = 0
            for sc in self._scopes.values():
                total += size(sc.children) + size(sc.edges) + size(sc.blocks)
                # a packed block int (~200 bits), an edge's int key, a node's length int
                total += len(sc.blocks) * _PACKED_BYTES + len(sc.edges) * _INT_BYTES
                total += len(sc.children) * _INT_BYTES
                total += size(sc.jumps) + len(sc.jumps) * jump_bytes
                total += sum(size(held) for held in sc.held.values())
            return total

    def holds(self, scope: Scope, replica_id: str) -> int:
        """Blocks of ``replica_id`` in ``scope`` (tests, debugging)."""
        with self._lock:
            sc = self._scopes.get(scope)
            return len(sc.held.get(replica_id, ())) if sc is not None else 0


def child_lengths(value: int | bytes) -> list[int]:
    """The byte lengths of a node's children, ascending (from ``ChainView.children``)."""
    return [value >> 32] if isinstance(value, int) else [length for length, _ in _PAIRS.iter_unpack(value)]


_PAIRS = struct.Struct("<II")


def _pairs(counts: Mapping[int, int]) -> bytes:
    return b"".join(_PAIRS.pack(length, n) for length, n in sorted(counts.items()))


def _add_length(children: dict[bytes, int | bytes], node: bytes, length: int) -> bool:
    """Count a child of ``length`` bytes under ``node``; whether it became a fork (its
    children now have two lengths, one before)."""
    value = children.get(node)
    if value is None:
        children[node] = length << 32 | 1
    elif isinstance(value, int):
        if value >> 32 == length:
            children[node] = value + 1
        else:
            children[node] = _pairs({value >> 32: value & _U32, length: 1})
            return True
    else:
        counts = dict(_PAIRS.iter_unpack(value))
        counts[length] = counts.get(length, 0) + 1
        children[node] = _pairs(counts)
    return False


def _mark_fork(sc: _ScopeBytes, node: bytes, blocks: int) -> None:
    """Set ``node``'s bit in the forks of every jump whose path passes it: the jump of
    ``node`` itself, and those of its ancestors whose first ``blocks - 1`` keys hold it
    (found up the blocks' parents; at most ``blocks`` probes, once per new fork). A fork
    that later loses its other children keeps its bit: the walk then checks it for nothing."""
    at = node
    for p in range(blocks):
        jump = sc.jumps.get(at)
        if jump is not None and (p == 0 or jump[JUMP_KEYS + p - 1] == node):
            forks = jump[JUMP_FORKS] | 1 << p  # type: ignore[operator]
            sc.jumps[at] = (*jump[:JUMP_FORKS], forks, *jump[JUMP_FORKS + 1 :])
        packed = sc.blocks.get(at)
        if packed is None:
            return
        at = fingerprint.key_bytes((packed >> 64) & _U64)


def _drop_length(children: dict[bytes, int | bytes], node: bytes, length: int) -> None:
    value = children[node]
    if isinstance(value, int):
        if value & _U32 > 1:
            children[node] = value - 1
        else:
            del children[node]
        return
    counts = dict(_PAIRS.iter_unpack(value))
    counts[length] -= 1
    if counts[length] <= 0:
        del counts[length]
    if len(counts) == 1:
        ((only, n),) = counts.items()
        children[node] = only << 32 | n
    else:
        children[node] = _pairs(counts)
