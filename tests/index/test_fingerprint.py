"""Golden vectors of our content fingerprint (the original's ``golden_vectors.json``,
seed-inventory §7.2a): byte-compatibility with every other producer of the key."""

from __future__ import annotations

import pytest

from inference_cache.index import fingerprint as fp


@pytest.mark.parametrize(
    ("tokens", "parent", "want"),
    [
        pytest.param(list(range(1, 17)), None, [16863443419780771464], id="1..16"),
        pytest.param(list(range(1, 33)), None, [16863443419780771464, 12466389667045779788], id="1..32"),
        pytest.param(list(range(100, 120)), None, [10823191264391160519], id="tail-dropped"),
        pytest.param(
            list(range(50, 82)), 3735928559, [13185224009891017151, 2998384554010166533], id="parent"
        ),
        pytest.param(list(range(10)), None, [], id="short"),
    ],
)
def test_golden_prefix_hashes(tokens: list[int], parent: int | None, want: list[int]) -> None:
    assert fp.prefix_hashes(tokens, 16, parent=parent) == want


def test_golden_long_chain_and_content() -> None:
    assert fp.prefix_hashes(list(range(64)), 16)[:3] == [
        15310707395893867146,
        13769157705258532664,
        11879827756109914528,
    ]
    assert fp.content_hash(list(range(17, 33))) == 2287610619914608821


def test_keys_are_big_endian_8_bytes() -> None:
    keys = fp.chain_keys(list(range(1, 33)), 16)
    assert keys[0] == (16863443419780771464).to_bytes(8, "big")
    assert [fp.key_int(k) for k in keys] == fp.prefix_hashes(list(range(1, 33)), 16)


def test_salt_starts_a_separate_chain() -> None:
    toks = list(range(1, 33))
    salted = fp.chain_keys(toks, 16, salt="tenant-secret")
    assert set(salted).isdisjoint(fp.chain_keys(toks, 16))
    root = fp.salt_root("tenant-secret")
    assert salted == fp.chain_keys(toks, 16, parent=root)
    assert fp.chain_keys(toks, 16, salt="other") != salted


def test_resume_from_parent_equals_whole_chain() -> None:
    toks = list(range(1000, 1064))
    whole = fp.prefix_hashes(toks, 16)
    assert fp.prefix_hashes(toks[32:], 16, parent=whole[1]) == whole[2:]
    assert fp.prefix_hashes(toks, 16, parent=whole[1], start=32) == whole[2:]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="block_size"):
        fp.prefix_hashes([1, 2], 0)
    with pytest.raises(ValueError, match="u32"):
        fp.prefix_hashes([2**32] * 16, 16)
