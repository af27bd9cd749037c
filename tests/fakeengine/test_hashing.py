"""Block hashes against vLLM 0.33.0's golden vectors (shared/data/kv-events), for every
algorithm and seed, plus the per-version seeding and extra-key rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inference_cache.fakeengine import hashing
from inference_cache.fakeengine.hashing import BlockHasher, HashAlgo, LoRA

V033 = (0, 33, 0)
TOKENS = list(range(1, 33))


def golden(path: Path) -> list[dict[str, object]]:
    """One record per (seed section, algorithm) of vllm_block_hash_golden_vectors.txt."""
    out: list[dict[str, object]] = []
    seed: str | None = None
    for line in path.read_text().splitlines():
        if line.startswith("### PYTHONHASHSEED"):
            seed = None if "unset" in line else line.split("=", 1)[1].strip()
        elif m := re.match(r"(\w+): seed=(\S+) NONE_HASH=([0-9a-f]+)", line):
            out.append(
                {"algo": m[1], "seed": seed, "seed_text": m[2], "none": bytes.fromhex(m[3]), "blocks": []}
            )
        elif m := re.match(r"\s+block\d.*= ([0-9a-f]+)\s+int64.*=(\d+)", line):
            out[-1]["blocks"].append((bytes.fromhex(m[1]), int(m[2])))  # type: ignore[attr-defined]
    return out


def test_golden_file_has_every_algorithm_twice(kv_events_dir: Path) -> None:
    records = golden(kv_events_dir / "vllm_block_hash_golden_vectors.txt")
    pairs = [(r["algo"], r["seed"]) for r in records]
    assert len(pairs) == 8 and set(pairs) == {(a, s) for a in hashing.HASH_ALGOS for s in (None, "0")}


@pytest.mark.parametrize("algo", hashing.HASH_ALGOS)
@pytest.mark.parametrize("seed", [None, "0"], ids=["unset", "seed0"])
def test_golden_vectors(kv_events_dir: Path, algo: HashAlgo, seed: str | None) -> None:
    (record,) = [
        r
        for r in golden(kv_events_dir / "vllm_block_hash_golden_vectors.txt")
        if r["algo"] == algo and r["seed"] == seed
    ]
    blocks: list[tuple[bytes, int]] = record["blocks"]  # type: ignore[assignment]
    random_root = seed is None and algo.startswith("xxhash")
    hasher = BlockHasher.create(algo, seed, 16, V033)
    if random_root:
        # vLLM drew a random seed; the chain from its recorded root must still match
        assert hasher.root != record["none"]
        hasher = BlockHasher(algo, record["none"], 16, V033)  # type: ignore[arg-type]
    else:
        assert hasher.root == record["none"]
    hashes = hasher.extend([], TOKENS + [99] * 15)  # the partial tail is never hashed
    assert hashes == [digest for digest, _ in blocks]
    assert [hashing.external(h) for h in hashes] == [ext for _, ext in blocks]


def test_unset_seed_is_random_before_029() -> None:
    a = BlockHasher.create("sha256_cbor", None, 16, (0, 28, 0))
    b = BlockHasher.create("sha256_cbor", None, 16, (0, 28, 0))
    assert a.root != b.root and len(a.root) == 32


def test_unset_seed_is_fixed_for_sha256_from_029() -> None:
    assert BlockHasher.create("sha256", None, 16, (0, 29, 0)).root == hashing.hash_function("sha256")(
        "vllm-none-hash"
    )


def test_seed_is_the_hashed_string_in_010() -> None:
    root = BlockHasher.create("sha256", "0", 16, (0, 10, 2)).root
    assert root.hex() == "1973e23848344dc43a988a9b478663803cfffe1243480253f9a3cf004b14aa7c"


@pytest.mark.parametrize(
    ("version", "lora_key", "salt_key"),
    [
        ((0, 11, 0), 7, "s"),
        ((0, 26, 0), "ad", "s"),
        ((0, 33, 0), ("lora", "ad", "/p"), ("cache_salt", "s")),
    ],
)
def test_extra_keys_per_version(version: tuple[int, int, int], lora_key: object, salt_key: object) -> None:
    lora = LoRA("ad", "/p", 7)
    assert hashing.hashed_extra_keys(version, first_block=True, lora=lora, cache_salt="s") == (
        lora_key,
        salt_key,
    )
    assert hashing.hashed_extra_keys(version, first_block=False, lora=lora, cache_salt="s") == (lora_key,)
    assert hashing.hashed_extra_keys(version, first_block=True, lora=None, cache_salt=None) is None


def test_published_extra_keys_are_untagged() -> None:
    assert hashing.event_extra_keys((("lora", "ad", "/p"), ("cache_salt", "s"))) == ("ad", "s")
    assert hashing.event_extra_keys(None) is None


def test_salt_changes_only_the_chain_from_block_0() -> None:
    hasher = BlockHasher.create("sha256_cbor", "0", 16, V033)
    plain = hasher.extend([], TOKENS)
    salted = hasher.extend([], TOKENS, cache_salt="tenant-a")
    assert plain[0] != salted[0] and plain[1] != salted[1]
    fn = hashing.hash_function("sha256_cbor")
    assert salted[1] == fn((salted[0], tuple(range(17, 33)), None))  # salt only in block 0's keys


def test_old_versions_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.10\.2"):
        BlockHasher.create("sha256", "0", 16, (0, 9, 0))
    with pytest.raises(ValueError, match=r"0\.14"):
        BlockHasher.create("xxhash", "0", 16, (0, 10, 2))
