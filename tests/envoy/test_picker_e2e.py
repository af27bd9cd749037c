"""End to end: a real Envoy, our server's ext_proc endpoint picker, simulated vLLM engines.

What is real: the Envoy binary running a shipped ``examples/envoy/`` config on loopback, our
``Server`` (in-process: index, KV-event subscribers, ext_proc over gRPC, engine scrapes),
the fake engines' HTTP API (OpenAI chat, usage with ``cached_tokens``, ``/metrics``) and
their ZMQ KV events, the Qwen tokenizer (``make tokenizer``). The client only talks to
Envoy's listener; which engine answered comes from the engine's ``x-engine-address``
response header and the engine's own ``cached_tokens`` confirms what we predicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from inference_cache import config as config_mod
from inference_cache import envoy
from inference_cache.extproc.serve import Server
from inference_cache.fakeengine import main as fakeengine
from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.proto import pb, pb_grpc

from .conftest import CONFIGS, DESTINATION

REPO = Path(__file__).resolve().parents[2]
QWEN = REPO / ".cache" / "tokenizers" / "qwen"
MODEL = "e2e-model"
BS = 16
SYNC_S = 10.0
DECISION_HEADER = "x-inference-cache-decision"
SYSTEM = (
    "[{team}] You are a meticulous assistant for the {team} team. Follow the house style, cite the runbook "
    "section you rely on, and never invent numbers. Context for this conversation: {topic}. "
)


def conversation(i: int, turns: int = 1) -> list[dict[str, str]]:
    """A chat whose long system prompt is unique to ``i`` (a cold prefix per ``i``)."""
    system = SYSTEM.format(team=f"team-{i}", topic=" ".join(f"fact-{i}-{k}" for k in range(60)))
    messages = [{"role": "system", "content": system}]
    for t in range(turns):
        if t:
            messages.append({"role": "assistant", "content": f"Answer {t} for {i}."})
        messages.append({"role": "user", "content": f"Question {t} about item {i}?"})
    return messages


@dataclass
class Reply:
    status: int
    engine: str
    prompt_tokens: int
    cached_tokens: int
    decision: dict[str, Any] | None
    body: dict[str, Any]


@dataclass
class Fleet:
    engines: list[fakeengine.Running]
    servers: list[Server]
    proxy: envoy.EnvoyProcess
    session: aiohttp.ClientSession
    stack: contextlib.AsyncExitStack = field(repr=False)

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.engines[i].port}"

    async def chat(
        self, messages: Sequence[Mapping[str, str]], *, headers: Mapping[str, str] | None = None, **body: Any
    ) -> Reply:
        payload = {"model": MODEL, "messages": list(messages), "max_tokens": 1, **body}
        async with self.session.post(
            self.proxy.url + "/v1/chat/completions", json=payload, headers=dict(headers or {})
        ) as response:
            data = await response.json(content_type=None)
            usage = data.get("usage") or {}
            decision = response.headers.get(DECISION_HEADER)
            return Reply(
                status=response.status,
                engine=response.headers.get("x-engine-address", ""),
                prompt_tokens=usage.get("prompt_tokens", 0),
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                decision=json.loads(decision) if decision else None,
                body=data,
            )

    def lagging(self) -> list[str]:
        """Engines whose published KV-event batches some live server has not applied."""
        out = []
        for server in self.servers:
            if server.addresses is None:
                continue
            applied = {w.replica_id: w.counters.batches for w in server.workers}
            for i, e in enumerate(self.engines):
                assert e.publisher is not None
                if applied.get(self.address(i), -1) != e.publisher.next_seq:
                    out.append(self.address(i))
        return out

    async def sync(self) -> None:
        """Until every live server applied every batch (bounded; polls a real condition)."""
        deadline = time.monotonic() + SYNC_S
        while lagging := self.lagging():
            assert time.monotonic() < deadline, f"KV events of {lagging} never reached the server"
            await asyncio.sleep(0.005)

    async def connect(self) -> None:
        """Until each subscriber saw a live batch (ZMQ slow joiner): ping the engines with
        ``/reset_prefix_cache`` (an ``AllBlocksCleared`` batch) until all are applied."""
        deadline = time.monotonic() + SYNC_S
        while True:
            silent = [i for i, e in enumerate(self.engines) if e.publisher and e.publisher.next_seq == 0]
            if not silent and not self.lagging():
                return
            assert time.monotonic() < deadline, "no KV events reached the server"
            for i in range(len(self.engines)):
                async with self.session.post(self.engines[i].url + "/reset_prefix_cache") as r:
                    await r.read()
            await asyncio.sleep(0.05)


StartFleet = Callable[..., Awaitable[Fleet]]


def server_config(
    engines: Sequence[fakeengine.Running], *, metrics: bool, **server: Any
) -> config_mod.Config:
    settings = config_mod.ServerSettings(
        grpc_bind_address="127.0.0.1:0",
        http_bind_address="127.0.0.1:0",
        snapshot_bind_address="127.0.0.1:0",
        extproc_bind_address="127.0.0.1:0",
        insecure_disable_auth=True,
        **{"debug_decision_header": True, **server},
    )
    cfg = config_mod.Config(
        server=settings,
        models=(config_mod.ModelConfig(name=MODEL, block_size=BS, tokenizer=str(QWEN)),),
        endpoints=tuple(
            config_mod.EndpointConfig(
                address=f"127.0.0.1:{e.port}",
                model=MODEL,
                kv_events=e.config.kv_events_endpoint or "",
                replay=e.config.replay_endpoint,
                metrics_url=f"{e.url}/metrics" if metrics else None,
            )
            for e in engines
        ),
        health_interval_s=0.5,
        stats_interval_s=0.1,
    )
    config_mod.validate(cfg)
    return cfg


@pytest.fixture
async def start_fleet() -> AsyncIterator[StartFleet]:
    """``await start_fleet(config, engines=3, servers=1, metrics=True, time_model=...,
    **server flags)``: everything stopped when the test ends."""
    assert (QWEN / "tokenizer.json").exists(), "run `make tokenizer` (make test does) first"
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            name: str,
            *,
            engines: int = 3,
            servers: int = 1,
            metrics: bool = True,
            time_model: TimeModel | None = None,
            **server: Any,
        ) -> Fleet:
            ipc = stack.enter_context(tempfile.TemporaryDirectory(prefix="ic-e2e-"))
            running = []
            for i in range(engines):
                r = await fakeengine.start(
                    fakeengine.EngineConfig(
                        tokenizer=QWEN,
                        model=MODEL,
                        port=0,
                        block_size=BS,
                        num_gpu_blocks=512,
                        max_model_len=4096,
                        kv_events_endpoint=f"ipc://{ipc}/e{i}-events",
                        replay_endpoint=f"ipc://{ipc}/e{i}-replay",
                        time_model=time_model or TimeModel(),
                    )
                )
                stack.push_async_callback(r.close)
                running.append(r)
            cfg = server_config(running, metrics=metrics, **server)
            started = []
            for _ in range(servers):
                srv = Server(cfg)
                await srv.start()
                stack.push_async_callback(srv.stop, 0)
                started.append(srv)
            extproc = [s.addresses.extproc for s in started if s.addresses is not None]
            engine_addresses = [f"127.0.0.1:{r.port}" for r in running]
            shipped = envoy.load_config(CONFIGS[name])
            rewritten = envoy.loopback(shipped, extproc=extproc, engines=engine_addresses)
            proxy = await stack.enter_async_context(envoy.EnvoyProcess(rewritten))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            fleet = Fleet(running, started, proxy, session, stack)
            await fleet.connect()
            return fleet

        yield start


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
