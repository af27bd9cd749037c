"""``/metrics`` of the matching modes and the byte path (issue #9): ``MatchingCollector``
read through ``serve.matching_readings`` from a real picker and byte index."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from inference_cache import config, tokenizer
from inference_cache.extproc import picker, serve
from inference_cache.extproc.metrics import ServerMetrics
from inference_cache.index import bytekeys, fingerprint, policy, store, types

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
BS = 16


def build(matching: str) -> tuple[picker.EndpointPicker, bytekeys.ByteIndex, ServerMetrics]:
    cfg = config.Config(
        models=(
            config.ModelConfig("m", block_size=BS, tokenizer=str(TINY), matching=matching),
            config.ModelConfig("plain"),
        ),
        endpoints=(
            config.EndpointConfig(address="10.0.0.1:8000", model="m", kv_events="tcp://127.0.0.1:1"),
            config.EndpointConfig(address="10.0.0.2:8000", model="plain"),
        ),
    )
    config.validate(cfg)
    toks = {"m": tokenizer.PromptTokenizer.load(TINY)}
    byte_indexes = serve.build_byte_indexes(cfg, toks)
    p = picker.EndpointPicker(
        cfg, store.Index(), policy.PolicyStore(), tokenizers=toks, byte_indexes=byte_indexes
    )
    metrics = ServerMetrics(read_matching=lambda: serve.matching_readings(p, byte_indexes))
    return p, byte_indexes["m"], metrics


def samples(metrics: ServerMetrics) -> set[str]:
    return {
        line
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line.startswith("inferencecache_")
    }


def test_the_mode_of_each_model_and_the_byte_index_size_are_exported() -> None:
    p, bidx, metrics = build("auto")
    ids = tokenizer.PromptTokenizer.load(TINY).encode("the quick brown fox jumps over the lazy dog " * 8)
    keys = fingerprint.chain_keys(ids, BS)
    bidx.blocks_stored(types.Scope("", "m", "vllm", ""), "10.0.0.1:8000", None, keys, ids[: len(keys) * BS])
    p.byte_boundaries["m", "exact"] += 2
    p.byte_fallbacks["m", picker.FALLBACK_NOT_CHAT] += 1
    got = samples(metrics)
    assert 'inferencecache_matching_mode{mode="bytes",model="m",requested="auto"} 1.0' in got
    assert 'inferencecache_matching_mode{mode="approximate",model="plain",requested="auto"} 1.0' in got
    assert f'inferencecache_byte_index_entries{{model="m"}} {float(len(keys))}' in got
    per_entry = next(s for s in got if s.startswith("inferencecache_byte_index_bytes_per_entry"))
    assert 50 < float(per_entry.split()[-1]) < 1000
    assert 'inferencecache_byte_match_boundaries_total{model="m",outcome="exact"} 2.0' in got
    assert 'inferencecache_byte_match_fallbacks_total{model="m",reason="not_chat"} 1.0' in got
    assert not any('model="plain"' in s for s in got if s.startswith("inferencecache_byte_"))


def test_bytes_asked_for_but_impossible_shows_as_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bytekeys.ByteTable.of
    monkeypatch.setattr(
        bytekeys.ByteTable, "of", lambda tok: dataclasses.replace(real(tok), recoverable=False, reason="no")
    )
    p, _bidx, metrics = build("bytes")
    assert 'inferencecache_matching_mode{mode="tokens",model="m",requested="bytes"} 1.0' in samples(metrics)
    p.set_endpoints("m", [config.EndpointConfig(address="10.0.0.1:8000", model="m")])  # no kv_events now
    assert 'inferencecache_matching_mode{mode="approximate",model="m",requested="bytes"} 1.0' in samples(
        metrics
    )
