"""Request bytes -> the cached blocks they cover, without tokenizing (issue #9).

Owner: ``inference_cache.index``; called on the request path (the ext_proc picker) in
place of ``tokenize -> fingerprint.chain_keys``. Data flow::

    rendered prompt --request_bytes (normaliser, BOS)--> bytes
      --walk over ByteIndex (hash the next slice of each child length; first miss stops)-->
      token-chain keys of the leading blocks whose bytes the request starts with
      --boundary check--> keys (the last block dropped while its end is not a token
      boundary of the request) --> Index.longest_prefix (unchanged)

Why the boundary check: a cached block's bytes can be a prefix of the request while its
final token merged differently with what followed it (``"hel" + "lo"`` cached after
``"hel"`` ended a word; the request's ``"hello"`` is one token), or while the request's
pre-tokens split the bytes before the block's end differently (a run of spaces the
pre-tokenizer's lookahead cuts one way before a letter and another before a tab). BPE
merges never cross a pre-token, and inside one pre-token the tokens left of a token
boundary are the BPE of the left part alone. So the check runs the tokenizer's own
pre-tokenizer on a few bytes around the block's end, BPE on the one pre-token holding the
request's last byte before it, and accepts the end when a request token ends exactly there
with the byte length of the cached block's final token (stored with its aux entry); an
added-token edge needs only the length. A failed check drops the block and checks the
previous end. Tokenizers without a usable pre-tokenizer or a BPE model fall back to
dropping the last block unless the request ends there or an added token ends there
(``drop_last``, reported separately).

Speculative keys (``speculative_keys``): a byte match names only blocks some engine has
reported, so a burst of one new prefix would have nothing to record before the first
engine's events arrive. The picker therefore records its choice for the request's bytes
past the matched blocks too, cut into fixed chunks of ``SPECULATIVE_CHUNK_BLOCKS`` estimated
blocks (``block_size x DEFAULT_BYTES_PER_TOKEN`` bytes each, fixed so that every server
replica cuts the same keys; ``SpeculativeIndex`` credits a chunk with the tokens those bytes
are at the request's estimated bytes per token, ``ByteMatch.chunk_tokens``): key ``i`` is
the running XXH3-64 (seed ``BYTE_SEED ^ 1``) of the last matched block's key (the chain's
root when none) followed by the first ``i + 1`` chunks. One streaming hash and one digest
per chunk: a 32k-token prompt costs ~260 digests and as many speculative entries (one per
estimated block measured 2,048 entries per decision, and the sweeps and garbage
collections of ~180k entries a second stalled the event loop for tens of ms at 32k tokens
and ~90 decisions/s). Two requests get
the same keys exactly when they matched the same blocks and their bytes agree through
those chunks: a new prefix sticks to its first replica; a request diverging mid-chunk
loses that chunk (the estimate in tokens is as rough as the bytes per token). These keys
never reach the ``Index``.

Known limit: blocks the engine generated (decode output) hold the model's tokens, which
need not be the tokenizer's canonical tokens for the same bytes; bytes then claim what
the token path would not.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

import xxhash
from tokenizers import Tokenizer

from inference_cache.index import bytekeys, fingerprint
from inference_cache.index.bytekeys import JUMP_DIGEST, JUMP_ENDS, JUMP_FORKS, JUMP_KEYS, JUMP_SPAN
from inference_cache.index.types import Scope

Boundary = Literal["none", "end", "exact", "dropped", "drop_last"]

#: Bytes of context on each side of a boundary given to the pre-tokenizer (doubled while
#: the pre-token holding the boundary is cut by the window, up to ``_MAX_WINDOW``).
_WINDOW = 32
_MAX_WINDOW = 16384
#: Request bytes per token assumed for the uncached rest when nothing matched and the
#: model's ``ByteIndex`` has stored no block yet (then it learns the ratio from them);
#: also the fixed byte size of speculative chunks (identical on every server replica).
DEFAULT_BYTES_PER_TOKEN = bytekeys.DEFAULT_BYTES_PER_TOKEN
#: Estimated blocks per speculative byte chunk (``speculative_keys``).
SPECULATIVE_CHUNK_BLOCKS = 8
_le = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class ByteMatch:
    """The leading cached blocks of a request, as token-chain keys for ``Index.longest_prefix``."""

    keys: tuple[bytes, ...]
    #: Request bytes those blocks cover.
    matched_bytes: int
    #: Blocks the walk matched before the boundary check.
    walked_blocks: int
    #: ``none`` (nothing walked), ``exact`` (the check passed), ``end`` (passed where
    #: the request ends), ``dropped`` (the check removed blocks), ``drop_last`` (the
    #: fallback rule ran: no replicable pre-tokenizer).
    boundary: Boundary
    #: Request length in bytes.
    total_bytes: int
    #: Bytes per token assumed for the rest when nothing matched: what the model's stored
    #: blocks averaged (``ByteIndex.bytes_per_token``).
    bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN

    @property
    def blocks(self) -> int:
        return len(self.keys)

    def matched_tokens(self, block_size: int) -> int:
        return self.blocks * block_size

    def bytes_per_token_estimate(self, block_size: int) -> float:
        """The matched part's bytes per token, else the model's learned ``bytes_per_token``."""
        matched = self.matched_tokens(block_size)
        return self.matched_bytes / matched if matched else self.bytes_per_token

    def chunk_tokens(self, block_size: int) -> int:
        """Tokens one speculative chunk (``chunk_bytes``) stands for, at this request's
        estimated bytes per token: what ``SpeculativeIndex`` credits per chunk key."""
        return max(1, round(chunk_bytes(block_size) / self.bytes_per_token_estimate(block_size)))

    def estimated_total_tokens(self, block_size: int) -> int:
        """Prompt length in tokens for the cost model: the matched blocks plus the rest at
        the matched part's bytes per token (without a match, ``bytes_per_token``: what the
        engines' stored blocks of this model averaged). A fixed guess here would misjudge
        every cold prompt's prefill, and with it the in-flight backlog the next requests
        are weighed against (measured: 4 bytes per token for text of 6.7 made cold chats
        look 1.7x longer, and a burst's second request left its prefix's replica)."""
        matched = self.matched_tokens(block_size)
        rest = self.total_bytes - self.matched_bytes
        if rest <= 0:
            return matched
        return matched + max(1, round(rest / self.bytes_per_token_estimate(block_size)))


def chunk_bytes(block_size: int) -> int:
    """Bytes per speculative chunk: fixed (``SPECULATIVE_CHUNK_BLOCKS`` blocks at
    ``DEFAULT_BYTES_PER_TOKEN``), so every server replica cuts the same keys."""
    return round(SPECULATIVE_CHUNK_BLOCKS * block_size * DEFAULT_BYTES_PER_TOKEN)


def speculative_keys(
    data: bytes, match: ByteMatch, block_size: int, *, salt: str | None = None
) -> list[bytes]:
    """One key per full chunk of the request's bytes past the matched blocks (module
    docstring), each standing for ``match.chunk_tokens(block_size)`` tokens: what the
    picker records, after the match's own keys, as the chosen replica's speculative entries."""
    chunk = chunk_bytes(block_size)
    if match.keys:
        node = match.keys[-1]
    else:
        node = fingerprint.key_bytes(fingerprint.salt_root(salt)) if salt else bytekeys.ROOT
    hasher = xxhash.xxh3_64(node, seed=_SPECULATIVE_SEED)
    view = memoryview(data)
    keys = []
    update, digest = hasher.update, hasher.digest
    for start in range(match.matched_bytes, len(data) - chunk + 1, chunk):
        update(view[start : start + chunk])
        keys.append(digest())
    return keys


_SPECULATIVE_SEED = bytekeys.BYTE_SEED ^ 1


class ByteMatcher:
    """Matches one model's requests against its ``ByteIndex``; stateless between calls."""

    def __init__(self, tokenizer: Tokenizer, index: bytekeys.ByteIndex) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self.table = index.table
        added = sorted(
            {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content},
            key=len,
            reverse=True,
        )
        self._added = re.compile("|".join(map(re.escape, added)).encode()) if added else None
        pre = tokenizer.pre_tokenizer
        #: The tokenizer's own pre-tokenizer and BPE can be replayed around a boundary.
        self.replicable = pre is not None and type(tokenizer.model).__name__ == "BPE"
        #: Pre-token strings are byte-level characters (one per byte).
        self._byte_pieces = pre is not None and pre.pre_tokenize_str("é")[0][0] != "é"
        self._bos, self._eos = _special_affixes(tokenizer, self.table)

    def request_bytes(self, text: str, *, add_special_tokens: bool = False) -> bytes | None:
        """The bytes the engine's tokens of ``text`` stand for: the normaliser applied and,
        with ``add_special_tokens``, the post-processor's prefix (``None``: it also appends
        tokens, which bytes cannot place)."""
        body = bytekeys.normalize(self.tokenizer, text).encode("utf-8")
        if not add_special_tokens:
            return body
        if self._bos is None or self._eos:
            return None
        return self._bos + body

    def match(self, scope: Scope, data: bytes, *, salt: str | None = None) -> ByteMatch:
        """Walk the byte chain of ``scope`` over ``data`` (from ``request_bytes``)."""
        root = fingerprint.key_bytes(fingerprint.salt_root(salt)) if salt else bytekeys.ROOT
        with self.index.reading(scope) as chain:
            ends, keys, jumped = self._walk(chain, data, root)
            walked = len(keys)
            if not keys:
                return ByteMatch((), 0, 0, "none", len(data), self.index.bytes_per_token)
            while keys:
                if jumped and jumped[-1][0] < len(keys):  # the last key is a jump's: exact ends
                    start, at, packed = jumped.pop()
                    assert chain.layout is not None
                    ends[start : start + chain.layout.blocks] = map(
                        at.__add__, chain.layout.ends.unpack(packed)
                    )
                last = chain.last_token_bytes(keys[-1])  # -1: a jump's block since removed
                if last >= 0 and self._is_boundary(data, ends[-1], last):
                    break
                keys.pop()
                ends.pop()
        boundary: Boundary = (
            "drop_last"
            if not self.replicable
            else "dropped"
            if len(keys) < walked
            else "end"
            if ends[-1] == len(data)
            else "exact"
        )
        return ByteMatch(
            tuple(keys), ends[-1] if ends else 0, walked, boundary, len(data), self.index.bytes_per_token
        )

    def _walk(
        self, chain: bytekeys.ChainView, data: bytes, root: bytes
    ) -> tuple[list[int], list[bytes], list[tuple[int, int, bytes]]]:
        """(end offset, token-chain key) of each leading block whose bytes ``data`` continues
        with; where two children match, one ending on a request token boundary wins. A
        node's jump whose span the request starts with takes all its blocks at once
        (``bytekeys`` module docstring) unless, at one of its forks, stepping would pick
        another child (``_follows``): its blocks' ends all read as the span's end, and
        the third list, (first key index, span start, packed ends) per jump taken, gives
        the exact ones to whoever needs them."""
        view = memoryview(data)
        n = len(data)
        ends: list[int] = []
        keys: list[bytes] = []
        jumped: list[tuple[int, int, bytes]] = []
        node, pos = root, 0
        seed, jump_seed = bytekeys.BYTE_SEED, bytekeys.JUMP_SEED
        xxh, pack = xxhash.xxh3_64_intdigest, _le.pack
        children, edges, jumps, layout = chain.children, chain.edges, chain.jumps, chain.layout
        while True:
            if layout is not None and (jump := jumps.get(node)) is not None:
                end = pos + jump[JUMP_SPAN]  # type: ignore[operator]
                if (
                    end <= n
                    and xxh(view[pos:end], jump_seed) == jump[JUMP_DIGEST]
                    and (not jump[JUMP_FORKS] or self._follows(chain, data, view, node, pos, jump))
                ):
                    jumped.append((len(keys), pos, jump[JUMP_ENDS]))  # type: ignore[arg-type]
                    keys += jump[JUMP_KEYS:]  # type: ignore[arg-type]
                    ends += (end,) * layout.blocks
                    pos, node = end, jump[-1]  # type: ignore[assignment]
                    continue
            lengths = children.get(node)
            if lengths is None:
                break
            if isinstance(lengths, int):  # one child length: the common case
                end = pos + (lengths >> 32)
                if end > n:
                    break
                key = edges.get(xxh(node + pack(xxh(view[pos:end], seed)), seed))
                if key is None:
                    break
                pos, node = end, key
            else:
                picked = self._pick(chain, data, view, node, pos, lengths)
                if picked is None:
                    break
                pos, node = picked
            ends.append(pos)
            keys.append(node)
        return ends, keys, jumped

    def _pick(
        self, chain: bytekeys.ChainView, data: bytes, view: memoryview, node: bytes, pos: int, lengths: bytes
    ) -> tuple[int, bytes] | None:
        """The child of a fork (``lengths``: its packed child lengths) the step walk takes at
        ``pos``: of those whose bytes ``data`` continues with, the longest ending on a
        request token boundary, else the longest (``None``: none)."""
        found = self._children(chain, view, node, pos, bytekeys.child_lengths(lengths))
        if len(found) > 1:
            last = chain.last_token_bytes
            found = [f for f in found if self._is_boundary(data, f[0], last(f[1]))] or found
        return found[-1] if found else None

    def _follows(
        self,
        chain: bytekeys.ChainView,
        data: bytes,
        view: memoryview,
        node: bytes,
        pos: int,
        jump: tuple[int | bytes, ...],
    ) -> bool:
        """Whether stepping from ``node`` at ``pos`` would pick the jump's child at each of
        its forks (``data`` starts with the jump's span): else the walk steps there."""
        assert chain.layout is not None
        forks: int = jump[JUMP_FORKS]  # type: ignore[assignment]
        ends = chain.layout.ends.unpack(jump[JUMP_ENDS])  # type: ignore[arg-type]
        keys: tuple[bytes, ...] = jump[JUMP_KEYS:]  # type: ignore[assignment]
        for p in range(len(keys)):
            if not forks >> p & 1:
                continue
            at, parent = (pos, node) if p == 0 else (pos + ends[p - 1], keys[p - 1])
            lengths = chain.children.get(parent)
            if isinstance(lengths, bytes):  # (a fork since pruned to one length: one child)
                picked = self._pick(chain, data, view, parent, at, lengths)
                if picked is None or picked[1] != keys[p]:
                    return False
        return True

    @staticmethod
    def _children(
        chain: bytekeys.ChainView, view: memoryview, node: bytes, pos: int, lengths: list[int]
    ) -> list[tuple[int, bytes]]:
        """Every child of ``node`` whose bytes ``view[pos:]`` starts with (one running hash)."""
        hasher = xxhash.xxh3_64(seed=bytekeys.BYTE_SEED)
        done = pos
        found = []
        for length in lengths:
            end = pos + length
            if end > len(view):
                break
            hasher.update(view[done:end])
            done = end
            key = chain.edges.get(bytekeys.edge_key(node, hasher.intdigest()))
            if key is not None:
                found.append((end, key))
        return found

    def _is_boundary(self, data: bytes, at: int, last: int) -> bool:
        """Whether the request's tokens end exactly at byte ``at`` with a final token of
        ``last`` bytes, as the cached block ending there does (see the module docstring)."""
        window = _WINDOW
        while True:
            verdict = self._check(data, at, last, window)
            if verdict is not None:
                return verdict
            if window >= _MAX_WINDOW:
                return False
            window *= 2

    def _check(self, data: bytes, at: int, last: int, window: int) -> bool | None:
        """The verdict from ``window`` bytes each side (``None``: the window cut the
        pre-token that ends the request's tokens at ``at``; retry wider)."""
        lo = _char_start(data, max(0, at - window))
        hi = _char_start(data, min(len(data), at + window))
        seg_lo, seg_hi = lo, hi
        if self._added is not None:
            for m in self._added.finditer(data, lo, hi):
                a, b = m.span()
                if a < at < b:
                    return False
                if b == at:
                    return last == b - a
                if b < at:
                    seg_lo = b
                else:
                    seg_hi = a
                    break
        if not self.replicable:
            return False
        cut_left = seg_lo == lo and lo > 0
        cut_right = seg_hi == hi and hi < len(data)
        text = data[seg_lo:seg_hi].decode("utf-8", "replace")
        pieces = self.tokenizer.pre_tokenizer.pre_tokenize_str(text)
        if self._byte_pieces:
            sizes = [len(p) for p, _ in pieces]
        else:
            sizes = [len(p.encode("utf-8")) for p, _ in pieces]
        bounds = list(accumulate(sizes, initial=seg_lo))
        if bounds[-1] != seg_hi:  # pieces do not tile the segment (a removing pre-tokenizer)
            return False
        # the pre-token holding the request's last byte before ``at``
        j = bisect_right(bounds, at - 1) - 1
        if (cut_left and j == 0) or (cut_right and j == len(sizes) - 1):
            return None
        offset = at - bounds[j]
        pos = 0
        for token in self.tokenizer.model.tokenize(pieces[j][0]):
            size = len(token.value) if self._byte_pieces else self.table.length(token.id)
            if size < 0:
                return False
            pos += size
            if pos >= offset:
                return pos == offset and size == last
        return False


def _char_start(data: bytes, i: int) -> int:
    """``i`` moved back to the first byte of the UTF-8 character it falls in."""
    while 0 < i < len(data) and data[i] & 0xC0 == 0x80:
        i -= 1
    return i


def _special_affixes(tokenizer: Tokenizer, table: bytekeys.ByteTable) -> tuple[bytes | None, bytes]:
    """Bytes the post-processor puts before and after a text with ``add_special_tokens``
    (``None`` before: they cannot be told apart)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            before, after = table.join(full[:k]), table.join(full[k + len(plain) :])
            return before, b"\0" if after is None else after
    return None, b""
