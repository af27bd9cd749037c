"""``inference-cache demo``: fake engines + the server in one process; does the index know
where each prefix lives?

Owner: the demo (``make demo``). Flow::

    demo_workload --first turns, random placement--> fake engines (HTTP)
    fake engines  --KV events (ZMQ ipc://, replay)--> Server (in-process) --> Index
    follow-up --render--> token ids --LookupRoute--> best replica --request--> that engine

Before every lookup the demo waits (bounded) until the server has applied every batch each
engine published, so the index is compared with the engines' state at the same instant.
Ground truth per follow-up: for every engine, the leading run of the prompt's blocks its
prefix cache holds (the engine's own block hashes against its cached set, capped as vLLM
caps a hit: the last prompt token is always recomputed), and the ``cached_tokens`` the chosen
engine then reports. A follow-up *agrees* when

* the index named a replica, that replica holds the longest run, its ``matched_tokens``
  (capped like the engine's hit) equals the run, and the engine reports exactly that many
  ``cached_tokens``; or
* the index answered no hint and no replica stands out: the longest run is below the
  policy's ``minimumMatchedTokens``, or every replica holds the same run.

Exit status: 0 when every follow-up agrees, 1 on a disagreement or a failure, 130 on Ctrl-C.
Everything started is stopped on every path (one ``AsyncExitStack``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc

from inference_cache import config as config_mod
from inference_cache import demo_workload
from inference_cache.demo_workload import Message, Step, WorkloadSettings
from inference_cache.extproc.serve import Server
from inference_cache.fakeengine import main as fakeengine
from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.proto import pb, pb_grpc

MODEL = "demo-model"
QWEN_TOKENIZER = Path(".cache/tokenizers/qwen")
TINY_TOKENIZER = Path("tests/data/tiny-tokenizer")
#: Fast simulated engines: the demo measures placement, not latency.
TIME_MODEL = TimeModel(prefill_tokens_per_second=1e7, decode_tokens_per_second=1e5)


class DemoError(Exception):
    """The demo could not run to the end (the message says why)."""


@dataclass(frozen=True)
class DemoSettings:
    tokenizer: Path
    engines: int = 4
    num_gpu_blocks: int = 96
    block_size: int = 16
    max_tokens: int = 16
    seed: int = 0
    tenant: str = "demo"
    """The engines' tenant: its policy (``server.policies``) governs the lookups."""
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    #: Bound on each wait for the index to catch up with the engines.
    sync_timeout_s: float = 10.0


@dataclass(frozen=True)
class Row:
    """One request of the run."""

    label: str
    prompt_tokens: int
    routed: bool
    """False for phase-1 requests (placed without the index)."""
    held: Mapping[str, int]
    """Engine -> tokens of the prompt's leading run in its prefix cache (capped)."""
    sent_to: str
    cached_tokens: int
    reason: str = ""
    chosen: str | None = None
    matched_tokens: int = 0
    floor: int = 0
    """The policy's ``minimumMatchedTokens`` (below it the index gives no hint)."""
    cap: int = 0
    """The most an engine can report cached: whole blocks, the last prompt token excluded."""

    @property
    def best(self) -> int:
        return max(self.held.values(), default=0)

    @property
    def agrees(self) -> bool:
        if self.cached_tokens != self.held[self.sent_to]:
            return False  # the engine's own answer differs from its cache state: never expected
        if self.chosen is not None:
            holds_longest = self.held.get(self.chosen, -1) == self.best
            return holds_longest and min(self.matched_tokens, self.cap) == self.best
        return self.best < self.floor or len(set(self.held.values())) == 1


@dataclass
class Report:
    engines: Sequence[str]
    rows: list[Row] = field(default_factory=list)
    events: Mapping[str, int] = field(default_factory=dict)

    @property
    def routed(self) -> list[Row]:
        return [r for r in self.rows if r.routed]

    @property
    def agreement(self) -> float:
        routed = self.routed
        return sum(r.agrees for r in routed) / len(routed) if routed else 1.0


def cached_ratio(rows: Sequence[Row]) -> float:
    prompt = sum(r.prompt_tokens for r in rows)
    return sum(r.cached_tokens for r in rows) / prompt if prompt else 0.0


def random_ratio(rows: Sequence[Row]) -> float:
    """The cached-token ratio uniformly random placement would have expected on ``rows``
    (each engine's held run, averaged)."""
    prompt = sum(r.prompt_tokens for r in rows)
    expected = sum(sum(r.held.values()) / len(r.held) for r in rows if r.held)
    return expected / prompt if prompt else 0.0


# -- the cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    engines: dict[str, fakeengine.Running]
    """Engine name (``e1``...) -> the running replica."""
    server: Server
    session: aiohttp.ClientSession
    stub: pb_grpc.InferenceCacheStub
    block_size: int

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.engines[name].port}"

    def name_of(self, replica_id: str) -> str:
        return next((n for n in self.engines if self.address(n) == replica_id), replica_id)

    def lagging(self) -> list[str]:
        """Engines whose published batches the server has not all applied yet."""
        applied = {w.replica_id: w.counters.batches for w in self.server.workers}
        out = []
        for name, running in self.engines.items():
            assert running.publisher is not None
            if applied.get(self.address(name), -1) != running.publisher.next_seq:
                out.append(name)
        return out

    async def wait_ingested(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while lagging := self.lagging():
            if time.monotonic() > deadline:
                raise DemoError(f"the index did not ingest the KV events of {', '.join(lagging)} in time")
            await asyncio.sleep(0.005)

    async def connect(self, timeout_s: float) -> None:
        """Until each subscriber has seen a live batch, events may be lost to ZMQ's slow
        joiner: ping lagging engines with ``/reset_prefix_cache`` (each publishes an empty
        ``AllBlocksCleared``) until the server has applied everything."""
        deadline = time.monotonic() + timeout_s
        while lagging := self.lagging() or [n for n, r in self.engines.items() if not _published(r)]:
            if time.monotonic() > deadline:
                raise DemoError(f"no KV events from {', '.join(lagging)} reached the server")
            for name in lagging:
                await self.post(name, "/reset_prefix_cache", None)
            with contextlib.suppress(DemoError):
                await self.wait_ingested(0.2)

    async def post(self, name: str, path: str, body: Mapping[str, Any] | None) -> Any:
        url = self.engines[name].url + path
        try:
            async with self.session.post(url, json=body) as response:
                if response.status != 200:
                    raise DemoError(f"{name} {path}: HTTP {response.status}: {await response.text()}")
                if response.content_type == "application/json":
                    return await response.json()
                return await response.text()
        except aiohttp.ClientError as e:
            raise DemoError(f"{name} {path}: {e}") from e

    def held(self, name: str, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids``' leading run in ``name``'s prefix cache, capped as a hit."""
        cache = self.engines[name].engine.cache
        hashes: list[bytes] = []
        cache.hasher.extend(hashes, token_ids)
        cached = cache.cached_hashes()
        run = 0
        for block_hash in hashes[: (len(token_ids) - 1) // self.block_size]:
            if block_hash not in cached:
                break
            run += 1
        return run * self.block_size

    async def lookup(self, token_ids: Sequence[int]) -> tuple[str, str | None, int]:
        """-> (reason code, best replica's engine name or None, its matched tokens)."""
        try:
            response = await self.stub.LookupRoute(
                pb.LookupRouteRequest(model_id=MODEL, token_ids=token_ids), timeout=5.0
            )
        except grpc.aio.AioRpcError as e:
            raise DemoError(f"LookupRoute: {e.code().name}: {e.details()}") from e
        if not response.replica_scores:
            return response.reason_code, None, 0
        best = response.replica_scores[0]
        return response.reason_code, self.name_of(best.replica_id), best.matched_tokens


def _published(running: fakeengine.Running) -> bool:
    return running.publisher is not None and running.publisher.next_seq > 0


async def start_cluster(settings: DemoSettings, stack: contextlib.AsyncExitStack) -> Cluster:
    ipc_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ic-demo-"))
    engines: dict[str, fakeengine.Running] = {}
    for i in range(1, settings.engines + 1):
        running = await fakeengine.start(
            fakeengine.EngineConfig(
                tokenizer=settings.tokenizer,
                model=MODEL,
                port=0,
                block_size=settings.block_size,
                num_gpu_blocks=settings.num_gpu_blocks,
                max_model_len=(settings.num_gpu_blocks - 1) * settings.block_size,
                kv_events_endpoint=f"ipc://{ipc_dir}/e{i}-events",
                replay_endpoint=f"ipc://{ipc_dir}/e{i}-replay",
                time_model=TIME_MODEL,
            )
        )
        stack.push_async_callback(running.close)
        engines[f"e{i}"] = running
    config = config_mod.Config(
        server=config_mod.ServerSettings(
            grpc_bind_address="127.0.0.1:0",
            http_bind_address="127.0.0.1:0",
            snapshot_bind_address="127.0.0.1:0",
            extproc_bind_address="127.0.0.1:0",
            insecure_disable_auth=True,
        ),
        models=(config_mod.ModelConfig(name=MODEL, block_size=settings.block_size),),
        endpoints=tuple(
            config_mod.EndpointConfig(
                address=f"127.0.0.1:{r.port}",
                model=MODEL,
                tenant=settings.tenant,
                kv_events=r.config.kv_events_endpoint or "",
                replay=r.config.replay_endpoint,
            )
            for r in engines.values()
        ),
    )
    config_mod.validate(config)
    server = Server(config)
    stack.push_async_callback(server.stop, 0.1)
    addresses = await server.start()
    session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
    channel = grpc.aio.insecure_channel(addresses.grpc)
    stack.push_async_callback(channel.close)
    return Cluster(engines, server, session, pb_grpc.InferenceCacheStub(channel), settings.block_size)


# -- the run ------------------------------------------------------------------------------------


def _say(progress: TextIO, text: str) -> None:
    print(text, file=progress, flush=True)


async def _request(
    cluster: Cluster,
    settings: DemoSettings,
    step: Step,
    history: dict[str, list[Message]],
    rng: random.Random,
    *,
    routed: bool,
) -> Row:
    messages = [*history.get(step.conversation, []), *step.messages]
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": role, "content": content} for role, content in messages],
        "max_tokens": settings.max_tokens,
    }
    await cluster.wait_ingested(settings.sync_timeout_s)
    rendered = await cluster.post(next(iter(cluster.engines)), "/v1/chat/completions/render", body)
    token_ids: list[int] = rendered["token_ids"]
    held = {name: cluster.held(name, token_ids) for name in cluster.engines}
    reason, chosen, matched = ("", None, 0)
    if routed:
        reason, chosen, matched = await cluster.lookup(token_ids)
    sent_to = chosen if chosen in cluster.engines else rng.choice(sorted(cluster.engines))
    answer = await cluster.post(sent_to, "/v1/chat/completions", body)
    usage = answer["usage"]
    history[step.conversation] = [*messages, ("assistant", answer["choices"][0]["message"]["content"])]
    return Row(
        label=step.label,
        prompt_tokens=usage["prompt_tokens"],
        routed=routed,
        held=held,
        sent_to=sent_to,
        cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
        reason=reason,
        chosen=chosen,
        matched_tokens=matched,
        floor=cluster.server.policies.policy(settings.tenant).minimum_matched_tokens,
        cap=(len(token_ids) - 1) // settings.block_size * settings.block_size,
    )


async def run_demo(settings: DemoSettings, progress: TextIO) -> Report:
    workload = demo_workload.generate(settings.workload)
    rng = random.Random(settings.seed)
    async with contextlib.AsyncExitStack() as stack:
        _say(
            progress,
            f"starting {settings.engines} fake engines (tokenizer {settings.tokenizer}) and the server",
        )
        cluster = await start_cluster(settings, stack)
        await cluster.connect(settings.sync_timeout_s)
        report = Report(engines=[f"{n}={cluster.address(n)}" for n in cluster.engines])
        history: dict[str, list[Message]] = {}
        phases = (
            (workload.first, False, "phase 1: placed at random"),
            (workload.follow_ups, True, "phase 2: routed by LookupRoute"),
        )
        for steps, routed, title in phases:
            _say(progress, f"{title}: {len(steps)} requests")
            for i, step in enumerate(steps, start=1):
                row = await _request(cluster, settings, step, history, rng, routed=routed)
                report.rows.append(row)
                mark = "" if not routed else ("  ok" if row.agrees else "  DISAGREES")
                _say(progress, f"  [{i:>3}/{len(steps)}] {row.label:<14} -> {row.sent_to}{mark}")
        await cluster.wait_ingested(settings.sync_timeout_s)
        events: dict[str, int] = {}
        for w in cluster.server.workers:
            for kind, n in w.counters.events.items():
                events[kind] = events.get(kind, 0) + n
        report.events = events
        _say(progress, "stopping")
    return report


def format_report(report: Report) -> str:
    lines = [f"engines: {', '.join(report.engines)}", ""]
    head = (
        f"{'request':<16}{'prompt':>7}  {'index says':<18}{'longest holder':<20}"
        f"{'sent to':<9}{'cached':>7}  ok"
    )
    lines += [head, "-" * len(head)]
    for r in report.routed:
        index = f"{r.chosen} ({r.matched_tokens})" if r.chosen else r.reason or "NO_HINT"
        holders = ",".join(n for n, t in r.held.items() if t == r.best) if r.best else "-"
        lines.append(
            f"{r.label:<16}{r.prompt_tokens:>7}  {index:<18}{f'{holders} ({r.best})':<20}"
            f"{r.sent_to:<9}{r.cached_tokens:>7}  {'yes' if r.agrees else 'NO'}"
        )
    routed, first = report.routed, [r for r in report.rows if not r.routed]
    agree = sum(r.agrees for r in routed)
    lines += [
        "",
        f"agreement: {agree}/{len(routed)} follow-ups ({100 * report.agreement:.1f}%)",
        f"cached-token ratio: {100 * cached_ratio(report.rows):.1f}% overall",
        f"  routed follow-ups: {100 * cached_ratio(routed):.1f}% "
        f"(random placement would expect {100 * random_ratio(routed):.1f}%)",
        f"  first turns, placed at random: {100 * cached_ratio(first):.1f}%",
        "KV events ingested: " + ", ".join(f"{k} {n}" for k, n in sorted(report.events.items())),
    ]
    return "\n".join(lines)


# -- the subcommand -----------------------------------------------------------------------------


def default_tokenizer() -> Path | None:
    for path in (QWEN_TOKENIZER, TINY_TOKENIZER):
        if (path / "tokenizer.json").exists():
            return path
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument(
        "--tokenizer",
        type=Path,
        help=f"tokenizer directory (default: {QWEN_TOKENIZER} from 'make tokenizer', else {TINY_TOKENIZER})",
    )
    p.add_argument("--engines", type=int, default=4, help="fake engines to start (default 4)")
    p.add_argument(
        "--num-gpu-blocks",
        type=int,
        help="KV blocks per engine, small enough to evict (default: 96 with the Qwen tokenizer, "
        "320 with any other: the tiny test tokenizer makes ~3x more tokens of the same text)",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--conversations", type=int, default=12, help="multi-turn chats")
    p.add_argument("--turns", type=int, default=4, help="turns per chat")
    p.add_argument("--rag-requests", type=int, default=12, help="requests sharing retrieved documents")
    p.add_argument("--seed", type=int, default=0)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    tokenizer = args.tokenizer or default_tokenizer()
    if tokenizer is None:
        raise DemoError(
            f"no tokenizer: run 'make tokenizer' (writes {QWEN_TOKENIZER}) or pass --tokenizer DIR"
        )
    if not (tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer).is_file():
        raise DemoError(f"{tokenizer}: no tokenizer.json there")
    if args.engines < 1 or args.conversations < 0 or args.turns < 1 or args.rag_requests < 0:
        raise DemoError("--engines and --turns must be >= 1; --conversations and --rag-requests >= 0")
    return DemoSettings(
        tokenizer=tokenizer,
        engines=args.engines,
        num_gpu_blocks=args.num_gpu_blocks or (96 if tokenizer == QWEN_TOKENIZER else 320),
        block_size=args.block_size,
        seed=args.seed,
        workload=WorkloadSettings(
            seed=args.seed, conversations=args.conversations, turns=args.turns, rag_requests=args.rag_requests
        ),
    )


async def main(args: argparse.Namespace, out: TextIO, progress: TextIO) -> int:
    """The whole subcommand on a running loop (tests await it): 0, or 1 on a failure or a
    disagreement."""
    try:
        settings = settings_from_args(args)
        if settings.tokenizer == TINY_TOKENIZER and args.tokenizer is None:
            _say(
                progress,
                f"note: {QWEN_TOKENIZER} not found ('make tokenizer'); using the tiny test tokenizer",
            )
        report = await run_demo(settings, progress)
    except DemoError as e:
        _say(progress, f"demo failed: {e}")
        return 1
    print(format_report(report), file=out, flush=True)
    if report.agreement < 1.0:
        _say(progress, "the index disagreed with the engines (see the rows marked NO)")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(main(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        _say(sys.stderr, "interrupted; everything started was stopped")
        return 130
