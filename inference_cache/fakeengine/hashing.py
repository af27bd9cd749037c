"""vLLM v1 prefix-cache block hashes, as the emulated vLLM version computes them.

Owner: ``inference_cache.fakeengine``; used by ``prefix_cache`` for every full block of a
request. Rules (``vllm/v1/core/kv_cache_utils.py`` and ``vllm/utils/hashing.py``, 0.10.2 -
0.33.0; see shared/research/protocols.md §2):

* ``h_i = hash_fn((parent or NONE_HASH, tuple(block_tokens), extra_keys))``; the parent is
  the full digest of the previous block; only full blocks are hashed.
* ``hash_fn`` = pickle protocol 5 (``sha256``, ``xxhash``) or canonical CBOR
  (``sha256_cbor``, ``xxhash_cbor``), digested by SHA-256 (32 bytes) or XXH3-128 (16 bytes).
* ``NONE_HASH = hash_fn(seed)``: the seed is ``PYTHONHASHSEED`` when given; otherwise
  ``"vllm-none-hash"`` for sha256* from 0.29, random for xxhash* from 0.29, and 32 random
  bytes (not hashed) before 0.29.
* Events carry the lower 64 bits of the big-endian digest (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``).
* Extra keys per block: LoRA, then ``cache_salt`` on block 0 only, in the version's form.

vLLM < 0.10.2 hashed to Python ints with a different object layout; that is not emulated.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import cbor2
import xxhash

from inference_cache.fakeengine.versions import Version

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[str, ...] = get_args(HashAlgo)
#: The oldest version whose hashing is emulated.
OLDEST_HASHING: Version = (0, 10, 2)
#: vLLM's default seed for sha256* when PYTHONHASHSEED is unset (>= 0.29).
DEFAULT_CRYPTO_SEED = "vllm-none-hash"

ExtraKey = object
_MASK64 = (1 << 64) - 1


def hash_function(algo: HashAlgo) -> Callable[[object], bytes]:
    """The ``hash_fn`` vLLM builds for ``--prefix-caching-hash-algo``."""
    serialise: Callable[[object], bytes]
    if algo.endswith("_cbor"):

        def serialise(obj: object) -> bytes:
            return cbor2.dumps(obj, canonical=True)
    else:

        def serialise(obj: object) -> bytes:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    if algo.startswith("sha256"):
        return lambda obj: hashlib.sha256(serialise(obj)).digest()
    return lambda obj: xxhash.xxh3_128_digest(serialise(obj))


def none_hash(algo: HashAlgo, seed: str | None, version: Version) -> bytes:
    """The chain root of the emulated version (random where vLLM's is random)."""
    fn = hash_function(algo)
    if seed is not None:
        return fn(seed)
    if version < (0, 29, 0):
        return os.urandom(32)
    if algo.startswith("sha256"):
        return fn(DEFAULT_CRYPTO_SEED)
    return fn(os.urandom(32).hex())


def external(block_hash: bytes) -> int:
    """What ``BlockStored.block_hashes`` carries: the low 64 bits of the big-endian digest."""
    return int.from_bytes(block_hash, "big") & _MASK64


@dataclass(frozen=True)
class LoRA:
    """A LoRA adapter as vLLM knows it: ``lora_int_id`` is assigned from 1 in load order."""

    name: str
    path: str
    int_id: int


def hashed_extra_keys(
    version: Version, *, first_block: bool, lora: LoRA | None, cache_salt: str | None
) -> tuple[ExtraKey, ...] | None:
    """``generate_block_hash_extra_keys`` of the version for one block (no multimodal, no
    prompt embeds): LoRA keys, then the salt on the first block; ``None`` when empty."""
    keys: list[ExtraKey] = []
    tagged = version >= (0, 31, 0)
    if lora is not None:
        if tagged:
            keys.append(("lora", lora.name, lora.path))
        elif version >= (0, 12, 0):
            keys.append(lora.name)
        else:
            keys.append(lora.int_id)
    if cache_salt is not None and first_block:
        keys.append(("cache_salt", cache_salt) if tagged else cache_salt)
    return tuple(keys) if keys else None


def event_extra_keys(keys: tuple[ExtraKey, ...] | None) -> tuple[ExtraKey, ...] | None:
    """``to_event_extra_keys``: the untagged form published in ``BlockStored.extra_keys``."""
    if keys is None:
        return None
    out: list[ExtraKey] = []
    for key in keys:
        if isinstance(key, tuple) and key and key[0] in ("lora", "cache_salt"):
            out.append(key[1])
        else:
            out.append(key)
    return tuple(out)


@dataclass(frozen=True)
class BlockHasher:
    """Chained block hashes for one engine (algorithm, root, block size, version)."""

    algo: HashAlgo
    root: bytes
    block_size: int
    version: Version

    @classmethod
    def create(cls, algo: HashAlgo, seed: str | None, block_size: int, version: Version) -> BlockHasher:
        if algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algorithm {algo!r}")
        if version < OLDEST_HASHING:
            raise ValueError("block hashing of vLLM < 0.10.2 is not emulated")
        if algo.startswith("xxhash") and version < (0, 14, 0):
            raise ValueError(f"{algo} exists from vLLM 0.14")
        return cls(algo, none_hash(algo, seed, version), block_size, version)

    def extra_keys(
        self, block_index: int, lora: LoRA | None, cache_salt: str | None
    ) -> tuple[ExtraKey, ...] | None:
        return hashed_extra_keys(self.version, first_block=block_index == 0, lora=lora, cache_salt=cache_salt)

    def extend(
        self,
        hashes: list[bytes],
        token_ids: Sequence[int],
        *,
        lora: LoRA | None = None,
        cache_salt: str | None = None,
    ) -> list[bytes]:
        """Append the hashes of the full blocks of ``token_ids`` not yet in ``hashes``."""
        fn = hash_function(self.algo)
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            parent = hashes[i - 1] if i else self.root
            block = tuple(token_ids[i * bs : (i + 1) * bs])
            hashes.append(fn((parent, block, self.extra_keys(i, lora, cache_salt))))
        return hashes
