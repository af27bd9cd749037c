"""The fault matrix, end to end: a real Envoy, our server, fake engines, and their faults.

What is real: the Envoy binary running a shipped ``examples/envoy/`` config, our ``Server``
in-process (index, KV-event subscribers with replay, ext_proc, engine scrapes), the fake
engines' HTTP API, ZMQ KV events and replay, the Qwen tokenizer. Faults come from the fake
engine's switches (``POST /_fault``: ``restart_publisher``, ``drop_batches``, ``stall_s``),
from stopping and restarting our server, and from hostile client bodies. Each case checks
the routing outcome (which engine answered, what we predicted in the debug header against
the engine's own ``cached_tokens``) and the recovery of our state (the index, the
subscriber's counters). Waits poll real conditions with a bounded deadline.
What each fault does and what recovers it: ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import random
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

import inference_cache
from inference_cache.extproc.openai import Limits
from inference_cache.extproc.scoring import ScoringSettings
from inference_cache.extproc.serve import Server
from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.index import types
from inference_cache.index.kvevents.counters import Counters
from inference_cache.index.policy import NamespacePolicy

from .conftest import BS, MODEL, SYNC_S, Fleet, Reply, StartFleet, conversation

#: Concurrent long prompts in the slow-tokenization burst.
BURST = 8
REPO = Path(__file__).resolve().parents[2]
#: Our package's source folders (allocations traced to these files are ours).
OURS = str(Path(inference_cache.__file__).parent)


# -- helpers ---------------------------------------------------------------------------
async def until(condition: Callable[[], bool], what: str, timeout_s: float = SYNC_S) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


def _keys(server: Server, messages: Sequence[Mapping[str, str]]) -> tuple[types.Scope, Sequence[bytes]]:
    route = server.picker.routes[MODEL]
    assert route.tokenizer is not None
    prompt = server.picker.precise_prompt(route, route.tokenizer.encode_chat(list(messages)))
    return types.Scope(route.tenant, MODEL, types.HASH_SCHEME_VLLM, ""), prompt.keys


def indexed(server: Server, messages: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Leading tokens of the prompt of ``messages`` our index holds, per replica."""
    scope, keys = _keys(server, messages)
    return {m.replica_id: m.matched_tokens for m in server.index.longest_prefix(scope, keys)}


def speculated(server: Server, messages: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """What the picker still assumes cached from its own recent decisions."""
    scope, keys = _keys(server, messages)
    return server.picker.speculative.match_tokens(scope, keys)


def full(prompt_tokens: int) -> int:
    """Tokens an engine caches of a prompt: its full blocks."""
    return (prompt_tokens // BS) * BS


def counters(server: Server, replica: str) -> Counters:
    return next(w.counters for w in server.workers if w.replica_id == replica)


def predicted(reply: Reply) -> int:
    """The matched tokens our decision predicted on the engine that answered."""
    assert reply.status == 200, reply.body
    assert reply.decision is not None
    chosen = reply.decision["ranked"][0]
    assert chosen["endpoint"] == reply.engine, "Envoy did not honour the decision"
    matched: int = chosen["matched_tokens"]
    return matched


def extproc_requests(server: Server) -> float:
    """ext_proc requests the server finished, whatever their outcome."""
    return sum(
        sample.value
        for metric in server.metrics.extproc.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def fault(fleet: Fleet, i: int, **switches: Any) -> None:
    async with fleet.session.post(fleet.engines[i].url + "/_fault", json=switches) as r:
        assert r.status == 200, await r.text()


async def direct(fleet: Fleet, i: int, messages: Sequence[Mapping[str, str]]) -> int:
    """A chat sent straight to engine ``i`` (another router's traffic); its prompt tokens."""
    body = {"model": MODEL, "messages": list(messages), "max_tokens": 1}
    async with fleet.session.post(fleet.engines[i].url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        tokens: int = (await r.json())["usage"]["prompt_tokens"]
        return tokens


async def first_turns(fleet: Fleet, ids: Sequence[int]) -> dict[int, Reply]:
    """First turns through Envoy, until our index holds each where it was served."""
    out = {}
    for i in ids:
        out[i] = reply = await fleet.chat(conversation(i))
        assert reply.status == 200, reply.body
    server = fleet.servers[0]
    for i, reply in out.items():
        await until(
            lambda i=i, r=reply: indexed(server, conversation(i)).get(r.engine) == full(r.prompt_tokens),  # type: ignore[misc]
            f"conversation {i} indexed on {reply.engine}",
        )
    return out


# -- the matrix ------------------------------------------------------------------------
async def test_engine_restart_drops_its_blocks_and_routing_to_it_recovers(start_fleet: StartFleet) -> None:
    # A short speculative TTL: our own recent decisions stop vouching for the restarted
    # engine's cache soon (they are not told about the restart, see docs/reliability.md).
    fleet = await start_fleet("buffered", engines=2, scoring=ScoringSettings(speculative_ttl_s=0.2))
    server = fleet.servers[0]
    firsts = await first_turns(fleet, range(4))
    a = firsts[0].engine
    ai = next(i for i in range(2) if fleet.address(i) == a)
    lived = [i for i, r in firsts.items() if r.engine == a]
    restarts = counters(server, a).restarts

    await fault(fleet, ai, restart_publisher=True)  # sequence back to 0, prefix cache gone
    # A restarted engine says nothing until it has work: its first batch (sequence 0, here
    # from another router's request) is how we learn of the restart.
    other = await direct(fleet, ai, conversation(50))
    await until(lambda: not any(indexed(server, conversation(i)).get(a) for i in lived), "blocks dropped")
    assert counters(server, a).restarts == restarts + 1
    await until(lambda: indexed(server, conversation(50)).get(a) == full(other), "rebuilt from sequence 0")
    await until(
        lambda: not any(a in speculated(server, conversation(i)) for i in lived), "speculation expired"
    )

    # Follow-ups of conversations that lived there: routed by what is really cached (nothing).
    seconds = {}
    for i in lived:
        seconds[i] = follow = await fleet.chat(conversation(i, turns=2))
        assert predicted(follow) == follow.cached_tokens == 0
    # ... and the index is rebuilt from new events as traffic returns.
    for i, follow in seconds.items():
        await until(
            lambda i=i, f=follow: indexed(server, conversation(i, 2)).get(f.engine) == full(f.prompt_tokens),  # type: ignore[misc]
            f"turn 2 of {i} indexed",
        )
        third = await fleet.chat(conversation(i, turns=3))
        assert third.engine == follow.engine
        assert predicted(third) == third.cached_tokens == full(follow.prompt_tokens) > 0
    # Routing to the restarted engine recovers: what it caches now draws its follow-ups.
    follow = await fleet.chat(conversation(50, turns=2))
    assert follow.engine == a
    assert predicted(follow) == follow.cached_tokens == full(other) > 0


async def test_dropped_batches_are_replayed_and_the_index_matches_the_engine(
    start_fleet: StartFleet,
) -> None:
    fleet = await start_fleet("buffered", engines=2)
    server = fleet.servers[0]
    first = (await first_turns(fleet, [0]))[0]
    a = first.engine
    ai = next(i for i in range(2) if fleet.address(i) == a)
    c = counters(server, a)
    gaps, replays, resyncs = c.gaps, c.replays_requested, c.resyncs
    publisher = fleet.engines[ai].publisher
    assert publisher is not None

    await fault(fleet, ai, drop_batches=1)
    seq = publisher.next_seq
    lost = await direct(fleet, ai, conversation(1))  # its batch is numbered, buffered, never sent
    assert publisher.next_seq > seq
    later = await direct(fleet, ai, conversation(2))  # the next batch reveals the gap
    await until(lambda: counters(server, a).gaps == gaps + 1, "gap seen")
    for i, tokens in ((0, first.prompt_tokens), (1, lost), (2, later)):
        await until(lambda i=i, t=tokens: indexed(server, conversation(i)).get(a) == full(t), f"{i} indexed")  # type: ignore[misc]
    c = counters(server, a)
    assert c.replays_requested == replays + 1
    assert c.resyncs == resyncs
    # Routing: each follow-up goes to the engine that caches it, as predicted.
    for i, tokens in ((0, first.prompt_tokens), (1, lost), (2, later)):
        follow = await fleet.chat(conversation(i, turns=2))
        assert follow.engine == a
        assert predicted(follow) == follow.cached_tokens == full(tokens)


async def test_without_replay_a_gap_resyncs_the_replica_and_nothing_wrong_is_routed(
    start_fleet: StartFleet,
) -> None:
    fleet = await start_fleet("buffered", engines=2, replay=False)
    server = fleet.servers[0]
    first = (await first_turns(fleet, [0]))[0]
    a = first.engine
    ai = next(i for i in range(2) if fleet.address(i) == a)
    resyncs = counters(server, a).resyncs

    await fault(fleet, ai, drop_batches=1)
    lost = await direct(fleet, ai, conversation(1))
    later = await direct(fleet, ai, conversation(2))
    await until(lambda: counters(server, a).resyncs == resyncs + 1, "resync")
    await until(lambda: indexed(server, conversation(2)).get(a) == full(later), "later batch indexed")
    # The replica's state was dropped: we under-know (conversations 0 and 1), never over-know.
    assert not indexed(server, conversation(0)).get(a)
    assert not indexed(server, conversation(1)).get(a)
    assert counters(server, a).replays_requested == 0

    truth = {0: full(first.prompt_tokens), 1: full(lost), 2: full(later)}
    replies = {}
    for i in truth:
        replies[i] = follow = await fleet.chat(conversation(i, turns=2))
        # Nothing wrong is routed: no engine is credited with blocks it does not have.
        assert predicted(follow) <= follow.cached_tokens
        if follow.engine == a:
            assert follow.cached_tokens == truth[i]
    assert replies[2].engine == a and predicted(replies[2]) == truth[2]
    # What the engine still caches from before the gap stays unknown to us: its new blocks
    # chain onto parents we forgot (orphans), so those conversations stay under-predicted
    # (never over-predicted) until the engine evicts and stores them again.
    for i in replies:
        third = await fleet.chat(conversation(i, turns=3))
        assert predicted(third) <= third.cached_tokens
    # Wherever those went, a turn on the engine itself proves the orphaning.
    await direct(fleet, ai, conversation(0, turns=4))
    await until(lambda: counters(server, a).orphan_blocks > 0, "orphaned blocks counted")


async def test_server_restart_under_load_fails_no_request_and_replay_rebuilds_the_index(
    start_fleet: StartFleet,
) -> None:
    fleet = await start_fleet("override-host", engines=2)
    firsts = await first_turns(fleet, range(3))
    statuses: list[int] = []
    decided: list[bool] = []
    done = asyncio.Event()

    async def client() -> None:
        k = 0
        while not done.is_set():
            payload = {"model": MODEL, "messages": conversation(1000 + k), "max_tokens": 1}
            k += 1
            try:
                async with fleet.session.post(fleet.proxy.url + "/v1/chat/completions", json=payload) as r:
                    await r.read()
                    statuses.append(r.status)
                    decided.append("x-inference-cache-decision" in r.headers)
            except aiohttp.ClientError:
                statuses.append(-1)
                decided.append(False)

    def decisions_since(n: int) -> Callable[[], bool]:
        return lambda: sum(decided[n:]) >= 3

    def undecided_since(n: int) -> Callable[[], bool]:
        return lambda: decided[n:].count(False) >= 3

    task = asyncio.create_task(client())
    try:
        await until(decisions_since(0), "routed by the first server")
        await fleet.servers[0].stop(0)  # in-flight ext_proc streams are cut
        mark = len(decided)
        await until(undecided_since(mark), "fail-open traffic while the server is down")
        server = await fleet.start_server(0)  # same ext_proc port, empty index
        for i, r in firsts.items():
            await until(
                lambda i=i, r=r: indexed(server, conversation(i)).get(r.engine) == full(r.prompt_tokens),  # type: ignore[misc]
                f"conversation {i} replayed",
            )
        mark = len(decided)
        await until(decisions_since(mark), "routed by the restarted server")
    finally:
        done.set()
        await task
    assert statuses and all(s == 200 for s in statuses), statuses
    assert decided.count(False) >= 3
    assert sum(c.replayed_batches for c in (w.counters for w in server.workers)) > 0
    # Conversations from before the restart are routed to their engine by the replayed index.
    for i, r in firsts.items():
        follow = await fleet.chat(conversation(i, turns=2))
        assert follow.engine == r.engine
        assert predicted(follow) == follow.cached_tokens == full(r.prompt_tokens)


async def test_a_stalled_engine_loses_new_traffic_and_wins_it_back(start_fleet: StartFleet) -> None:
    stall_s = 3.0
    fleet = await start_fleet("buffered", engines=2, time_model=TimeModel(max_num_seqs=2))
    server = fleet.servers[0]
    firsts = await first_turns(fleet, range(6))
    by_engine: dict[str, list[int]] = {}
    for i, r in firsts.items():
        by_engine.setdefault(r.engine, []).append(i)
    a, (p, q, *_) = next((e, ids) for e, ids in by_engine.items() if len(ids) >= 2)
    ai = next(i for i in range(2) if fleet.address(i) == a)

    await fault(fleet, ai, stall_s=stall_s)
    stuck = [asyncio.create_task(fleet.chat(conversation(p, turns=2))) for _ in range(3)]
    try:
        await until(
            lambda: (g := server.picker.inflight.engine(a)) is not None and bool(g.waiting),
            "the stalled engine's queue in its gauges",
        )
        assert server.picker.inflight.load(a)[0] >= 3  # our in-flight count shows it too
        moved = await fleet.chat(conversation(q, turns=2))
        assert moved.status == 200 and moved.engine != a, "new traffic kept going to a stalled engine"
        assert moved.decision is not None
        ranked = {r["endpoint"]: r for r in moved.decision["ranked"]}
        assert ranked[a]["matched_tokens"] == full(firsts[q].prompt_tokens)  # moved despite its cache
    finally:
        replies = await asyncio.gather(*stuck)
    # A stall delays, it does not fail; once over, the engine's cache wins its traffic back.
    assert all(r.status == 200 and r.engine == a for r in replies)
    await until(
        lambda: (g := server.picker.inflight.engine(a)) is not None and not g.waiting, "queue drained"
    )
    await until(
        lambda: indexed(server, conversation(p, 2)).get(a) == full(replies[0].prompt_tokens), "turn 2 indexed"
    )
    back = await fleet.chat(conversation(p, turns=3))
    assert back.engine == a
    assert predicted(back) == back.cached_tokens == full(replies[0].prompt_tokens)


async def test_malformed_and_oversized_bodies_get_4xx_and_leave_the_server_healthy(
    start_fleet: StartFleet,
) -> None:
    limit = 64 * 1024
    fleet = await start_fleet("buffered", engines=2, limits=Limits(max_body_bytes=limit))
    server = fleet.servers[0]
    url = fleet.proxy.url + "/v1/chat/completions"
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * limit}]}).encode()
    bodies: list[tuple[bytes, int]] = [
        (b"{not json", 400),
        (b"[1, 2, 3]", 400),
        (json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400),
        (
            json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            404,
        ),
        (big, 413),  # over our limits.max_body_bytes: we answer
    ]

    async def send(body: bytes | io.BytesIO, want: int) -> None:
        async with fleet.session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            await r.read()
            assert r.status == want, (body[:40] if isinstance(body, bytes) else "<17 MiB>", r.status)

    async def rounds(n: int) -> None:
        sem = asyncio.Semaphore(8)

        async def one(body: bytes, want: int) -> None:
            async with sem:
                await send(body, want)

        await asyncio.gather(*(one(*bodies[k % len(bodies)]) for k in range(n)))

    await rounds(1000)  # warm-up: pools, metric label sets, once-per-kind logs, gRPC state
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await rounds(1000)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ours = [s for s in after.compare_to(before, "filename") if s.traceback[0].filename.startswith(OURS)]
    grown = sum(s.size_diff for s in ours)
    assert grown < 512 * 1024, sorted(ours, key=lambda s: -s.size_diff)[:5]
    # Over the listener's per_connection_buffer_limit_bytes (16 MiB): Envoy answers itself.
    huge = io.BytesIO(b'{"model": "' + MODEL.encode() + b'", "pad": "' + b"x" * (17 * 1024 * 1024) + b'"}')
    seen = extproc_requests(server)
    await send(huge, 413)
    assert extproc_requests(server) == seen  # the body never reached us
    # Healthy afterwards: a real request is routed on its prefix.
    ok = await fleet.chat(conversation(0))
    assert ok.status == 200 and ok.decision is not None and ok.decision["match"] == "precise"


async def test_slow_tokenization_falls_back_to_load_only_routing(start_fleet: StartFleet) -> None:
    fleet = await start_fleet("buffered", engines=2, tenant_header=True)
    server = fleet.servers[0]
    # A 1 ms matching budget for one tenant; a long cold prompt tokenizes in several ms.
    server.policies.replace([NamespacePolicy(namespace="hurried", lookup_timeout_ms=1)])
    rng = random.Random(5)

    def long_prompt() -> list[dict[str, str]]:
        words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(450))  # ~3,000 tokens
        return [{"role": "user", "content": words}]

    timeouts = server.metrics.extproc.decisions.labels(MODEL, "timeout")._value.get()
    # A burst: tokenizations queue behind each other (a tokenizer holding the GIL cannot be
    # interrupted, so the deadline bounds the wait for a worker, see docs/reliability.md).
    hurried = {"x-inference-cache-tenant": "hurried"}
    replies = await asyncio.gather(*(fleet.chat(long_prompt(), headers=hurried) for _ in range(BURST)))
    matches = [r.decision["match"] if r.decision else None for r in replies]
    for reply in replies:
        assert reply.status == 200, reply.body
        assert reply.decision is not None
        if reply.decision["match"] == "timeout":
            assert all(r["matched_tokens"] == 0 for r in reply.decision["ranked"])  # load only
    late = matches.count("timeout")
    assert late >= 1, matches
    assert server.metrics.extproc.decisions.labels(MODEL, "timeout")._value.get() == timeouts + late
    # The same kind of prompt under the default budget is matched precisely.
    control = await fleet.chat(long_prompt())
    assert control.status == 200 and control.decision is not None
    assert control.decision["match"] == "precise"
