"""End to end: a real Envoy, our server's ext_proc endpoint picker, simulated vLLM engines.

What is real: the Envoy binary running a shipped ``examples/envoy/`` config on loopback, our
``Server`` (in-process: index, KV-event subscribers, ext_proc over gRPC, engine scrapes),
the fake engines' HTTP API (OpenAI chat, usage with ``cached_tokens``, ``/metrics``) and
their ZMQ KV events, the Qwen tokenizer (``make tokenizer``). The client only talks to
Envoy's listener; which engine answered comes from the engine's ``x-engine-address``
response header and the engine's own ``cached_tokens`` confirms what we predicted.
The fleet (``start_fleet``) lives in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence

import aiohttp
import grpc
import pytest

from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.proto import pb, pb_grpc

from .conftest import BS, DESTINATION, MODEL, SYNC_S, Fleet, Reply, StartFleet, conversation


async def first_turns(fleet: Fleet, ids: Sequence[int]) -> dict[int, Reply]:
    out = {}
    for i in ids:
        reply = await fleet.chat(conversation(i))
        assert reply.status == 200, reply.body
        out[i] = reply
    await fleet.sync()
    return out


@pytest.mark.parametrize("name", ["buffered", "duplex"])
async def test_shared_prefixes_land_where_cached_and_cold_ones_spread(
    start_fleet: StartFleet, name: str
) -> None:
    fleet = await start_fleet(name)
    registry = fleet.servers[0].metrics.registry
    addresses = [fleet.address(i) for i in range(len(fleet.engines))]

    def per_endpoint(metric: str) -> dict[str, float]:
        return {a: registry.get_sample_value(metric, {"replica_id": a}) or 0 for a in addresses}

    batches_before = per_endpoint("inferencecache_kv_endpoint_batches_total")
    # Five conversations over three engines: a rotation could not send every follow-up
    # back to its first turn's engine by chance.
    firsts = await first_turns(fleet, range(5))
    # Cold prefixes spread: the picker's per-prefix tie-break and load move them around.
    assert len({r.engine for r in firsts.values()}) >= 2
    for i, first in firsts.items():
        follow = await fleet.chat(conversation(i, turns=2))
        assert follow.status == 200
        assert follow.engine == first.engine, f"conversation {i} left its cache"
        # The engine confirms what we predicted: every full block of the first turn.
        assert follow.decision is not None
        predicted = follow.decision["ranked"][0]
        assert predicted["endpoint"] == follow.engine
        assert follow.cached_tokens == predicted["matched_tokens"] == (first.prompt_tokens // BS) * BS
        assert follow.decision["match"] == "precise"
    # Per endpoint: what was routed there, and the KV-event batches its engine published.
    await fleet.sync()
    served = Counter(r.engine for r in firsts.values())
    assert per_endpoint("inferencecache_extproc_routed_total") == {a: 2 * served[a] for a in addresses}
    batches = per_endpoint("inferencecache_kv_endpoint_batches_total")
    assert {a: batches[a] > batches_before[a] for a in addresses} == {a: served[a] > 0 for a in addresses}


async def test_a_saturated_replica_sheds_new_traffic_to_a_less_loaded_one(start_fleet: StartFleet) -> None:
    # Two sequences at a time, 100 decode tokens/s: long direct requests make the engine queue.
    fleet = await start_fleet("buffered", engines=2, time_model=TimeModel(max_num_seqs=2))
    first = (await first_turns(fleet, [0]))[0]
    busy = next(i for i in range(2) if fleet.address(i) == first.engine)
    server = fleet.servers[0]

    async def hog() -> None:
        body = {"model": MODEL, "prompt": "hold the line " * 8, "max_tokens": 500}
        with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
            async with fleet.session.post(fleet.engines[busy].url + "/v1/completions", json=body) as r:
                await r.read()

    hogs = [asyncio.create_task(hog()) for _ in range(6)]
    try:
        deadline = time.monotonic() + SYNC_S
        while (g := server.picker.inflight.engine(first.engine)) is None or not g.waiting:
            assert time.monotonic() < deadline, "the engine's waiting gauge never reached the picker"
            await asyncio.sleep(0.02)
        follow = await fleet.chat(conversation(0, turns=2))
        assert follow.status == 200
        assert follow.engine != first.engine, "a queued replica kept new traffic for a small prefix"
        assert follow.decision is not None
        ranked = {r["endpoint"]: r for r in follow.decision["ranked"]}
        assert ranked[first.engine]["matched_tokens"] > 0  # it was chosen despite the cache, not by mistake
    finally:
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)


async def test_fail_open_keeps_traffic_flowing_and_clients_still_cannot_choose(
    start_fleet: StartFleet,
) -> None:
    fleet = await start_fleet("override-host")
    firsts = await first_turns(fleet, [0])
    assert firsts[0].decision is not None  # our picker routed it
    await fleet.servers[0].stop(0)
    spoofed = fleet.address(0)
    served = []
    for i in range(9):
        reply = await fleet.chat(conversation(100 + i), headers={DESTINATION: spoofed})
        assert reply.status == 200, reply.body
        assert reply.decision is None  # nobody decided: Envoy's round robin did
        served.append(reply.engine)
    assert set(served) == {fleet.address(i) for i in range(3)}, served


async def test_two_server_replicas_agree(start_fleet: StartFleet) -> None:
    fleet = await start_fleet("buffered", servers=2)
    firsts = await first_turns(fleet, range(8))
    for i, first in firsts.items():
        follow = await fleet.chat(conversation(i, turns=2))
        assert follow.engine == first.engine
    # Both replicas decided some of these requests, and both would decide every one alike.
    for server in fleet.servers:
        assert server.metrics.extproc.decisions.labels(MODEL, "precise")._value.get() > 0
    for i, first in firsts.items():
        tokens = fleet.servers[0].picker.routes[MODEL].tokenizer
        assert tokens is not None
        chosen = set()
        for server in fleet.servers:
            assert server.addresses is not None
            async with grpc.aio.insecure_channel(server.addresses.grpc) as ch:
                resp = await pb_grpc.InferenceCacheStub(ch).LookupRoute(
                    pb.LookupRouteRequest(model_id=MODEL, prompt_text=conversation(i)[-1]["content"])
                )
                ids = tokens.encode_chat(conversation(i, turns=2))
                scored = await pb_grpc.InferenceCacheStub(ch).LookupRoute(
                    pb.LookupRouteRequest(model_id=MODEL, token_ids=ids)
                )
            assert resp.reason_code in ("PREFIX_MATCH", "LEAST_LOADED")
            chosen.add(scored.replica_scores[0].replica_id)
        assert chosen == {first.engine}


async def test_follow_ups_stick_without_engine_metrics_or_response_processing(
    start_fleet: StartFleet,
) -> None:
    """No ``metrics_url`` and response bodies never shown to us (buffered config): in-flight
    tickets linger after the stream closes, and the KV index still keeps each conversation
    on the engine that caches it, turn after turn."""
    fleet = await start_fleet("buffered", metrics=False)
    first = (await first_turns(fleet, [7]))[7]
    for turns in range(2, 7):
        reply = await fleet.chat(conversation(7, turns=turns))
        assert reply.status == 200
        assert reply.engine == first.engine, f"turn {turns} moved"
        assert reply.cached_tokens > 0
        await fleet.sync()


async def test_idle_response_headers_are_skipped_by_mode_override(start_fleet: StartFleet) -> None:
    """Without the debug header and response body processing the server asks Envoy (its
    ``allowed_override_modes``) to skip the response headers: two ext_proc messages per
    request instead of three; with the debug header on, Envoy sends them."""
    counts = {}
    for debug in (False, True):
        fleet = await start_fleet("buffered", engines=2, debug_decision_header=debug)
        before = await fleet.proxy.stats()
        for i in range(4):
            reply = await fleet.chat(conversation(200 + i))
            assert reply.status == 200 and reply.engine
            assert (reply.decision is not None) is debug
        after = await fleet.proxy.stats()
        key = next(k for k in after if k.endswith("ext_proc.stream_msgs_sent"))
        counts[debug] = (int(after[key]) - int(before.get(key, 0))) / 4
    assert counts == {False: 2, True: 3}
