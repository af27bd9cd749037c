"""Every path that removes index entries removes the byte index's mirror of them (issue #9).

The server's wiring (``serve.Server``: ``Index.add_eviction_listener`` and
``add_clear_listener`` -> the model's ``ByteIndex``) is exercised on a server that is built
but not started: entries are fed as a replica's KV events feed them (bytes first, then the
index, the same keys), then removed through each path."""

from __future__ import annotations

from pathlib import Path

from inference_cache import config, tokenizer
from inference_cache.extproc import serve
from inference_cache.index import fingerprint, policy, store, types

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
MODEL, TENANT, BS = "m", "t", 16
A, B = "10.0.0.1:8000", "10.0.0.2:8000"
SCOPE = types.Scope(TENANT, MODEL, types.HASH_SCHEME_VLLM, "")
TEXT = "the quick brown fox jumps over the lazy dog " * 8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server(clock: Clock, **index: int) -> serve.Server:
    cfg = config.Config(
        models=(config.ModelConfig(MODEL, block_size=BS, tokenizer=str(TINY)),),
        endpoints=tuple(
            config.EndpointConfig(address=a, model=MODEL, tenant=TENANT, kv_events="tcp://127.0.0.1:1")
            for a in (A, B)
        ),
        server=config.ServerSettings(insecure_disable_auth=True),
    )
    config.validate(cfg)
    toks = {MODEL: tokenizer.PromptTokenizer.load(TINY)}
    return serve.Server(cfg, tokenizers=toks, clock=clock, index_settings=store.IndexSettings(**index))


def feed(s: serve.Server, replica: str) -> list[bytes]:
    ids = s.picker.routes[MODEL].tokenizer.tokenizer.encode(TEXT)  # type: ignore[union-attr]
    keys = fingerprint.chain_keys(ids, BS)
    s.byte_indexes[MODEL].blocks_stored(SCOPE, replica, None, keys, ids[: len(keys) * BS])
    s.index.blocks_stored(SCOPE, replica, keys, [BS * (i + 1) for i in range(len(keys))])
    return keys


def held(s: serve.Server, replica: str) -> int:
    return s.byte_indexes[MODEL].holds(SCOPE, replica)


def test_the_server_feeds_only_byte_recoverable_models() -> None:
    s = server(Clock())
    assert set(s.byte_indexes) == {MODEL}
    assert s.picker.routes[MODEL].matching == "bytes"


def test_ttl_expiry_drops_the_byte_entries() -> None:
    clock = Clock()
    s = server(clock)
    keys = feed(s, A)
    assert held(s, A) == len(keys) > 1
    clock.now += policy.DEFAULT_TTL_S + 1
    s.index.sweep()
    assert held(s, A) == 0 and s.byte_indexes[MODEL].entries == 0


def test_the_entry_cap_drops_the_byte_entries() -> None:
    s = server(Clock(), max_entries=3)
    feed(s, A)
    assert s.index.total_entries == 3 == held(s, A)


def test_a_tenant_quota_drops_the_byte_entries() -> None:
    s = server(Clock())
    s.policies.replace([], [policy.TenantQuota(TENANT, max_index_entries=2)])
    feed(s, A)
    with s.byte_indexes[MODEL].reading(SCOPE) as chain:
        assert len(chain.blocks) == 2


def test_a_cleared_replica_drops_its_byte_entries_only() -> None:
    s = server(Clock())
    keys = feed(s, A)
    feed(s, B)
    s.index.apply_event(
        types.Event(types.EventType.ALL_CLEARED, A, model=MODEL, tenant=TENANT)
    )  # PublishEvent
    assert (held(s, A), held(s, B)) == (0, len(keys))
    s.index.replica_cleared(B, model=MODEL, tenant=TENANT)  # a stopped endpoint worker
    assert held(s, B) == 0 and s.byte_indexes[MODEL].entries == 0


def test_a_published_prefix_eviction_drops_the_byte_entry() -> None:
    s = server(Clock())
    keys = feed(s, A)
    s.index.apply_event(
        types.Event(types.EventType.PREFIX_EVICTED, A, model=MODEL, tenant=TENANT, prefix_hash=keys[-1])
    )
    assert held(s, A) == len(keys) - 1


def test_stale_byte_entries_never_claim_what_the_index_dropped() -> None:
    """Whatever the byte chain still holds, the match goes through ``Index.longest_prefix``."""
    s = server(Clock())
    keys = feed(s, A)
    s.index.blocks_removed(SCOPE, A, keys[1:])  # the index alone (as PREFIX_EVICTED does today)
    assert held(s, A) == len(keys)
    assert [m.matched_blocks for m in s.index.longest_prefix(SCOPE, keys)] == [1]
