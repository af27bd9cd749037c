"""The server's Prometheus series: names, labels and buckets as the original, scraped from
the real ``/metrics`` of an in-process ``Server`` on 127.0.0.1 (aiohttp client), plus the
scrape-time collector over index and ingest counters.

Index state is real (RPCs and the index's own write methods); only the ingest counters of
``ingest_readings`` come from plain ``Counters`` objects, as the subscribers fill them.
"""

from __future__ import annotations

import dataclasses
import gc
from collections import Counter
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference_cache import config
from inference_cache.extproc import auth, metrics, serve
from inference_cache.index import types
from inference_cache.index.kvevents.counters import Counters
from inference_cache.index.policy import TenantQuota
from inference_cache.index.store import IndexSettings

LOOPBACK = config.ServerSettings(
    grpc_bind_address="127.0.0.1:0",
    http_bind_address="127.0.0.1:0",
    snapshot_bind_address="127.0.0.1:0",
    extproc_bind_address="127.0.0.1:0",
    insecure_disable_auth=True,
)
SCOPE = types.Scope("t", "m", "vllm")


@pytest.fixture()
async def started() -> AsyncIterator[list[serve.Server]]:
    servers: list[serve.Server] = []
    yield servers
    for srv in servers:
        await srv.stop()


async def _start(
    servers: list[serve.Server], settings: config.ServerSettings = LOOPBACK, **kw: Any
) -> serve.Server:
    srv = serve.Server(config.Config(server=settings), **kw)
    await srv.start()
    servers.append(srv)
    return srv


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(srv: serve.Server) -> Samples:
    assert srv.addresses is not None
    url = f"http://{srv.addresses.http}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _v(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


async def test_contract_series_and_buckets(started: list[serve.Server]) -> None:
    srv = await _start(started)
    srv.index.blocks_stored(SCOPE, "r1", [b"a", b"b"], [16, 32])
    srv.metrics.observe_lookup("m", "NO_HINT", False, 0.0003)
    got = await _scrape(srv)
    assert _v(got, "inferencecache_server_up") == 1
    assert _v(got, "inferencecache_server_grpc_tls_enabled") == 0
    assert _v(got, "inferencecache_index_entries", model="m") == 2
    calls = _v(
        got, "inferencecache_lookup_route_calls_total", hint_used="false", model="m", reason_code="NO_HINT"
    )
    assert calls == 1
    buckets = sorted(
        float(dict(labels)["le"])
        for name, labels in got
        if name == "inferencecache_lookup_route_latency_seconds_bucket"
    )
    assert buckets == [*metrics.LOOKUP_LATENCY_BUCKETS, float("inf")]
    assert _v(got, "inferencecache_lookup_route_latency_seconds_bucket", le="0.00025", model="m") == 0
    assert _v(got, "inferencecache_lookup_route_latency_seconds_bucket", le="0.0005", model="m") == 1
    assert _v(got, "inferencecache_index_size_entries") == 2
    assert _v(got, "inferencecache_index_distinct_keys") == 2
    assert any(name.startswith("process_") for name, _ in got)


async def test_drained_model_reports_zero(started: list[serve.Server]) -> None:
    srv = await _start(started)
    srv.index.blocks_stored(SCOPE, "r1", [b"a"], [16])
    srv.index.replica_cleared("r1", model="m", tenant="t")
    assert _v(await _scrape(srv), "inferencecache_index_entries", model="m") == 0


async def test_index_and_tenant_evictions_are_read_at_scrape_time(started: list[serve.Server]) -> None:
    srv = await _start(started, index_settings=IndexSettings(max_entries=2))
    srv.policies.replace([], [TenantQuota("q", 1)])
    srv.index.blocks_stored(SCOPE, "r1", [b"a", b"b", b"c"], [16, 32, 48])
    srv.index.blocks_stored(types.Scope("q", "m", "vllm"), "r2", [b"x", b"y"], [16, 32])
    got = await _scrape(srv)
    assert _v(got, "inferencecache_index_evictions_total", algorithm="lru", reason="cap") >= 1
    assert _v(got, "inferencecache_tenant_evictions_total", reason="over_entries", tenant_id="q") >= 1


async def test_controller_auth_results_are_counted(started: list[serve.Server]) -> None:
    settings = dataclasses.replace(
        LOOPBACK, insecure_disable_auth=False, allowed_controller_sa="system:serviceaccount:ns:controller"
    )
    async with auth.KubeTokenReviewer(auth.KubeAPIConfig(base_url="http://127.0.0.1:9")) as reviewer:
        srv = await _start(started, settings, reviewer=reviewer)
        assert srv.addresses is not None
        async with aiohttp.ClientSession() as session:
            for path in ("/snapshot", "/policy", "/policy"):
                async with session.get(f"http://{srv.addresses.snapshot}{path}") as resp:
                    assert resp.status == 401
            for _ in range(3):
                async with session.put(f"http://{srv.addresses.snapshot}/templates", data=b"{}") as resp:
                    assert resp.status == 401
        got = await _scrape(srv)
    assert _v(got, "inferencecache_snapshot_auth_total", result="unauth") == 1
    assert _v(got, "inferencecache_policy_auth_total", result="unauth") == 2
    assert _v(got, "inferencecache_templates_auth_total", result="unauth") == 3


async def test_server_up_drops_to_zero_after_stop(started: list[serve.Server]) -> None:
    srv = await _start(started)
    assert srv.metrics.registry.get_sample_value("inferencecache_server_up") == 1
    await srv.stop()
    assert srv.metrics.registry.get_sample_value("inferencecache_server_up") == 0


async def test_gc_pauses_are_observed_while_the_server_runs(started: list[serve.Server]) -> None:
    """A collection while serving lands in ``inferencecache_gc_pause_seconds`` (scraped);
    after stop the process-wide ``gc.callbacks`` hook is gone."""
    hooks = len(gc.callbacks)
    srv = await _start(started)
    assert len(gc.callbacks) == hooks + 1
    gc.collect()
    got = await _scrape(srv)
    assert _v(got, "inferencecache_gc_pause_seconds_count", generation="2") >= 1
    assert _v(got, "inferencecache_gc_pause_seconds_sum", generation="2") > 0
    await srv.stop()
    assert len(gc.callbacks) == hooks
    before = srv.metrics.registry.get_sample_value(
        "inferencecache_gc_pause_seconds_count", {"generation": "2"}
    )
    gc.collect()
    after = srv.metrics.registry.get_sample_value(
        "inferencecache_gc_pause_seconds_count", {"generation": "2"}
    )
    assert after == before


def test_ingest_counters_are_summed_over_endpoints() -> None:
    a = Counters(events=Counter(BlockStored=3, BlockRemoved=1), gaps=1, orphan_blocks=2)
    a.decode_errors["msgpack"] += 2
    a.skipped_blocks["medium"] += 4
    a.batches, a.replayed_batches = 7, 2
    b = Counters(events=Counter(BlockStored=2), resyncs=1, replays_requested=5)
    b.decode_errors["framing"] += 1
    b.batches = 3
    quiet = Counters()  # subscribed, nothing yet: a 0 series (an alert can test it)
    workers = [
        SimpleNamespace(counters=a, subscriber=object(), endpoint=SimpleNamespace(address="10.0.0.1:8000")),
        SimpleNamespace(counters=b, subscriber=object(), endpoint=SimpleNamespace(address="10.0.0.2:8000")),
        SimpleNamespace(
            counters=quiet, subscriber=object(), endpoint=SimpleNamespace(address="10.0.0.3:8000")
        ),
        # no kv_events: no subscriber, no series
        SimpleNamespace(
            counters=Counters(), subscriber=None, endpoint=SimpleNamespace(address="10.0.0.4:8000")
        ),
    ]
    readings = serve.ingest_readings(workers)  # type: ignore[arg-type]
    assert readings == metrics.IngestReadings(
        events={"BlockStored": 5, "BlockRemoved": 1},
        decode_errors=3,
        gaps=1,
        replays=5,
        resyncs=1,
        orphan_blocks=2,
        skipped_blocks={"medium": 4},
        batches_by_endpoint={"10.0.0.1:8000": 9, "10.0.0.2:8000": 3, "10.0.0.3:8000": 0},
    )
    m = metrics.ServerMetrics(read_ingest=lambda: readings)
    assert m.registry.get_sample_value("inferencecache_kv_events_total", {"type": "BlockStored"}) == 5
    assert m.registry.get_sample_value("inferencecache_kv_events_total", {"type": "AllBlocksCleared"}) == 0
    # before any event: every type is a 0 series (an alert on "no events" can fire after a restart)
    fresh = metrics.ServerMetrics(read_ingest=metrics.IngestReadings)
    types_ = ("BlockStored", "BlockRemoved", "AllBlocksCleared", "unknown")
    assert [
        fresh.registry.get_sample_value("inferencecache_kv_events_total", {"type": t}) for t in types_
    ] == [
        0,
        0,
        0,
        0,
    ]
    assert m.registry.get_sample_value("inferencecache_kv_event_decode_errors_total") == 3
    assert m.registry.get_sample_value("inferencecache_kv_skipped_blocks_total", {"reason": "medium"}) == 4
    assert m.registry.get_sample_value("inferencecache_kv_event_replays_total") == 5
    per_endpoint = {
        address: m.registry.get_sample_value(
            "inferencecache_kv_endpoint_batches_total", {"replica_id": address}
        )
        for address in ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000")
    }
    assert per_endpoint == {"10.0.0.1:8000": 9, "10.0.0.2:8000": 3, "10.0.0.3:8000": 0, "10.0.0.4:8000": None}
