"""Our content fingerprint: the ``vllm`` hash scheme's block keys.

Owner: ``inference_cache.index``; used by ingest (from ``BlockStored.token_ids``), by the
``subscribe`` sidecar (in the pod, so token ids never leave it) and by the request path
(from the request's tokens). Byte-compatible with the original project's later key::

    content(block)  = XXH3_64(seed=1337, le_u32(tok) for tok in block)
    prefix[0]       = content[0]                                   (fresh sequence)
    prefix[0]       = XXH3_64(1337, le_u64(parent) ++ le_u64(content[0]))   (chained)
    prefix[i]       = XXH3_64(1337, le_u64(prefix[i-1]) ++ le_u64(content[i]))
    key bytes       = 8-byte big-endian prefix[i]; a partial trailing block is dropped

``cache_salt`` enters the key, not the scope: a salted chain starts from
``parent = XXH3_64(1337, utf8(salt))`` through the chained rule above, so salted and
unsalted prompts never share keys.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence

import xxhash

SEED = 1337
_xxh = xxhash.xxh3_64_intdigest
_pair = struct.Struct("<QQ")
_be = struct.Struct(">Q")
#: ``array("I")`` is native-endian; the key is defined over little-endian words.
_SWAP = sys.byteorder == "big"
assert array.array("I").itemsize == 4, "u32 token arrays need a 4-byte unsigned int"


def content_hash(tokens: Sequence[int]) -> int:
    """XXH3-64 (seed 1337) over the little-endian u32 encoding of ``tokens``."""
    return _xxh(struct.pack(f"<{len(tokens)}I", *tokens), SEED)


def chain_hash(parent: int, content: int) -> int:
    return _xxh(_pair.pack(parent, content), SEED)


def salt_root(salt: str) -> int:
    """The parent a salted chain starts from."""
    return _xxh(salt.encode("utf-8"), SEED)


def key_bytes(prefix: int) -> bytes:
    return _be.pack(prefix)


def key_int(key: bytes) -> int:
    return int(_be.unpack(key)[0])


def prefix_hashes(
    tokens: Sequence[int], block_size: int, *, parent: int | None = None, start: int = 0
) -> list[int]:
    """Chained prefix hashes of the full blocks of ``tokens[start:]``.

    ``parent`` is the prefix hash of the block before ``tokens[start]`` (``None`` for a
    fresh, unsalted sequence).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_full = (len(tokens) - start) // block_size
    if n_full <= 0:
        return []
    # One C-level conversion of every token to little-endian u32, then one hash per block
    # over a zero-copy slice (measured: docs/benchmarks.md, "block keys").
    try:
        words = array.array("I", tokens[start : start + n_full * block_size])
    except OverflowError as exc:
        raise ValueError(f"token id out of u32 range: {exc}") from exc
    if _SWAP:
        words.byteswap()
    view = memoryview(words).cast("B")
    step = 4 * block_size
    xxh, pair = _xxh, _pair.pack
    out: list[int] = []
    prev = parent
    for b in range(n_full):
        c = xxh(view[b * step : (b + 1) * step], SEED)
        prev = c if prev is None else xxh(pair(prev, c), SEED)
        out.append(prev)
    return out


def chain_keys(
    tokens: Sequence[int], block_size: int, *, salt: str | None = None, parent: int | None = None
) -> list[bytes]:
    """8-byte keys of every full block of ``tokens``; ``salt`` starts a salted chain."""
    if salt:
        if parent is not None:
            raise ValueError("salt and parent are exclusive")
        parent = salt_root(salt)
    return [_be.pack(h) for h in prefix_hashes(tokens, block_size, parent=parent)]
