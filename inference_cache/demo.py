"""``inference-cache demo``: fake engines, the server and a real Envoy; the same workload
routed by us (cache-aware) and round robin, side by side.

Owner: the demo (``make demo``). Flow, once per routing mode::

    demo_workload --chat (stream)--> Envoy (envoy-buffered.yaml) --ext_proc--> Server (in-process)
        Server: tokenize (the engines' tokenizer) -> match the index -> predicted TTFT -> engine
    Envoy --ORIGINAL_DST (x-gateway-destination-endpoint)--> that fake engine --SSE--> client
    fake engines --KV events (ZMQ ipc://)--> Server --> Index;  /metrics --> Server (load)

One Envoy serves both runs with an unchanged config: after the cache-aware run the server
is stopped and a new one is started on the SAME ext_proc port in ``round-robin`` mode (the
same parsing and tokenizing per request, only the choice differs). Before each run every
engine's prefix cache is reset and the (fresh) server has applied that reset, so both runs
start cold. Requests are sent one at a time, streamed; the client measures time to first
token at the first content chunk, and reads ``usage`` (prompt and cached tokens) from the
last chunk and the answering engine from its ``x-engine-address`` response header.

Ground truth per request: right before sending it, every engine's leading run of the
prompt's blocks in its own prefix cache (the engine's block hashes against its cached set,
capped as vLLM caps a hit: the last prompt token is always recomputed). A follow-up *landed*
when the answering engine held the longest run (any engine, when no engine held a block)
and reported exactly that many ``cached_tokens``.

Templated requests (``demo_workload.TemplatedStep``) run first in each mode: the server gets
the PromptTemplates by ``PUT /templates`` after the reset; with the warm-up on (the
default, ``--no-warmup`` turns it off) the demo waits until it has pre-filled each
template's stable prefix and the index has the engines' events, then asks each template
its questions through Envoy (the body names the template; the server renders it). The
first request of each template *hit* when it landed (as above) on a holder of its stable
blocks.

Exit status: 0 when the cache-aware run's hit ratio (cached / prompt tokens) beats round
robin's, every cache-aware follow-up landed and, with the warm-up on, every template's
first cache-aware request hit; 1 otherwise or on a failure; 130 on Ctrl-C.
Everything started is stopped on every path (one ``AsyncExitStack``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
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
from inference_cache import demo_workload, envoy, render
from inference_cache.demo_workload import Message, Step, WorkloadSettings
from inference_cache.extproc import templates as templates_mod
from inference_cache.extproc.serve import Server
from inference_cache.fakeengine import main as fakeengine
from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.proto import pb_grpc

MODEL = "demo-model"
QWEN_TOKENIZER = Path(".cache/tokenizers/qwen")
TINY_TOKENIZER = Path("tests/data/tiny-tokenizer")
#: The shipped Envoy config the demo runs (relative to the repository).
ENVOY_CONFIG = Path("examples/envoy/envoy-buffered.yaml")
#: Prefill at the scorer's default rate (``scoring.prefill_tokens_per_s``), so an uncached
#: 400-token prompt takes 40 ms to its first token; decode fast enough to keep the demo short.
TIME_MODEL = TimeModel(prefill_tokens_per_second=10_000, decode_tokens_per_second=1_000)
MODES = ("cache-aware", "round-robin")


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
    envoy: str | None = None
    """The Envoy binary (``None``: :func:`inference_cache.envoy.find_envoy`)."""
    envoy_config: Path = ENVOY_CONFIG
    #: Bound on each wait for the index, an engine or Envoy.
    sync_timeout_s: float = 10.0
    #: Seconds between the server's scrapes of each engine's ``/metrics``.
    stats_interval_s: float = 1.0
    #: Pre-fill each template's stable prefix (``warmup.enabled``) before its requests.
    warmup: bool = True
    #: ``models[].matching`` of the demo model (``auto``: bytes with a byte-level tokenizer).
    matching: str = "auto"


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One request of one run."""

    label: str
    follow_up: bool
    prompt_tokens: int
    held: Mapping[str, int]
    """Engine -> tokens of the prompt's leading run in its prefix cache (capped), just before
    the request was sent."""
    sent_to: str
    """The engine that answered (``x-engine-address``)."""
    cached_tokens: int
    ttft_s: float
    #: A request naming a PromptTemplate; ``template_first``: that template's first.
    templated: bool = False
    template_first: bool = False

    @property
    def best(self) -> int:
        return max(self.held.values(), default=0)

    @property
    def holders(self) -> list[str]:
        """The engines holding the longest run (none when nothing is cached anywhere)."""
        return [n for n, t in self.held.items() if t == self.best] if self.best else []

    @property
    def landed(self) -> bool:
        """Answered by an engine holding the longest run, which reported exactly that run."""
        return self.held.get(self.sent_to, -1) == self.best and self.cached_tokens == self.best


@dataclass
class Run:
    """One pass of the workload under one routing mode."""

    routing: str
    engines: Sequence[str]
    rows: list[Row] = field(default_factory=list)

    @property
    def follow_ups(self) -> list[Row]:
        return [r for r in self.rows if r.follow_up]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.rows)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.rows)

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def per_engine(self) -> dict[str, int]:
        counts = dict.fromkeys(self.engines, 0)
        for r in self.rows:
            counts[r.sent_to] = counts.get(r.sent_to, 0) + 1
        return counts

    def ttft_ms(self) -> tuple[float, float]:
        """Client-measured time to first token, p50 and p90 (ms)."""
        ttfts = [r.ttft_s for r in self.rows]
        return 1e3 * percentile(ttfts, 50), 1e3 * percentile(ttfts, 90)

    @property
    def landed(self) -> int:
        return sum(r.landed for r in self.follow_ups)

    @property
    def template_firsts(self) -> list[Row]:
        return [r for r in self.rows if r.template_first]

    @property
    def first_hits(self) -> int:
        """Templates whose first request landed on a holder of cached blocks."""
        return sum(r.landed and r.cached_tokens > 0 for r in self.template_firsts)

    @property
    def templated_hit_ratio(self) -> float:
        rows = [r for r in self.rows if r.templated]
        prompt = sum(r.prompt_tokens for r in rows)
        return sum(r.cached_tokens for r in rows) / prompt if prompt else 0.0


def percentile(values: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (1..99), interpolated between closest ranks; 0 for no values."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...]


def verdict(aware: Run, baseline: Run, *, warmup: bool = False) -> Verdict:
    """Pass when routing by cache beats round robin on hit ratio, every cache-aware
    follow-up landed on the engine holding its longest cached prefix and, with the
    ``warmup`` on, every template's first cache-aware request hit."""
    reasons = []
    if not aware.hit_ratio > baseline.hit_ratio:
        reasons.append(
            f"the cache-aware hit ratio {100 * aware.hit_ratio:.1f}% does not beat round robin's "
            f"{100 * baseline.hit_ratio:.1f}%"
        )
    missed = [r.label for r in aware.follow_ups if not r.landed]
    if missed:
        reasons.append(f"cache-aware follow-ups not on their prefix's engine: {', '.join(missed)}")
    cold = [r.label for r in aware.template_firsts if not (r.landed and r.cached_tokens > 0)]
    if warmup and cold:
        reasons.append(f"with the warm-up on, first template requests that did not hit: {', '.join(cold)}")
    return Verdict(not reasons, tuple(reasons))


# -- the cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The engines and one server subscribed to them."""

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

    async def reset(self, timeout_s: float) -> None:
        """Empty every engine's prefix cache (retried while an engine still holds blocks),
        then wait until the server has applied every engine's reset."""
        deadline = time.monotonic() + timeout_s
        for name in self.engines:
            while (status := await self._reset(name)) == 409:
                if time.monotonic() > deadline:
                    raise DemoError(f"{name} kept its KV blocks busy: /reset_prefix_cache answered 409")
                await asyncio.sleep(0.01)
            if status != 200:
                raise DemoError(f"{name} /reset_prefix_cache: HTTP {status}")
        await self.connect(max(deadline - time.monotonic(), 0.0))

    async def _reset(self, name: str) -> int:
        try:
            async with self.session.post(self.engines[name].url + "/reset_prefix_cache") as response:
                return response.status
        except aiohttp.ClientError as e:
            raise DemoError(f"{name} /reset_prefix_cache: {e}") from e

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

    async def put_templates(self, stored: Sequence[templates_mod.StoredTemplate]) -> None:
        """Replace the server's PromptTemplates as the operator does (``PUT /templates``)."""
        assert self.server.addresses is not None
        url = f"http://{self.server.addresses.snapshot}/templates"
        try:
            async with self.session.put(url, data=templates_mod.encode(stored)) as response:
                if response.status != 204:
                    raise DemoError(f"PUT /templates: HTTP {response.status}: {await response.text()}")
        except aiohttp.ClientError as e:
            raise DemoError(f"PUT /templates: {e}") from e

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


def _published(running: fakeengine.Running) -> bool:
    return running.publisher is not None and running.publisher.next_seq > 0


async def start_engines(
    settings: DemoSettings, stack: contextlib.AsyncExitStack
) -> dict[str, fakeengine.Running]:
    """``settings.engines`` fake engines on 127.0.0.1 (ephemeral ports), KV events over ipc://."""
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
    return engines


def server_config(
    settings: DemoSettings,
    engines: Mapping[str, fakeengine.Running],
    *,
    routing: str = "cache-aware",
    extproc_port: int = 0,
    warmup: config_mod.WarmupSettings | None = None,
    templates: Sequence[config_mod.TemplateConfig] = (),
) -> config_mod.Config:
    """The server's configuration: every engine (events, replay, ``/metrics``), the model
    with the engines' tokenizer (precise matching), loopback listeners, and the template
    warm-up when ``warmup`` is given (templates arrive by ``PUT /templates``)."""
    config = config_mod.Config(
        server=config_mod.ServerSettings(
            grpc_bind_address="127.0.0.1:0",
            http_bind_address="127.0.0.1:0",
            snapshot_bind_address="127.0.0.1:0",
            extproc_bind_address=f"127.0.0.1:{extproc_port}",
            insecure_disable_auth=True,
            routing=routing,
        ),
        models=(
            config_mod.ModelConfig(
                name=MODEL,
                block_size=settings.block_size,
                tokenizer=str(settings.tokenizer),
                matching=settings.matching,
            ),
        ),
        endpoints=tuple(
            config_mod.EndpointConfig(
                address=f"127.0.0.1:{r.port}",
                model=MODEL,
                tenant=settings.tenant,
                kv_events=r.config.kv_events_endpoint or "",
                replay=r.config.replay_endpoint,
                metrics_url=f"{r.url}/metrics",
            )
            for r in engines.values()
        ),
        stats_interval_s=settings.stats_interval_s,
        warmup=warmup or config_mod.WarmupSettings(),
        templates=tuple(templates),
    )
    config_mod.validate(config)
    return config


async def attach_server(
    settings: DemoSettings,
    engines: dict[str, fakeengine.Running],
    session: aiohttp.ClientSession,
    stack: contextlib.AsyncExitStack,
    *,
    routing: str = "cache-aware",
    extproc_port: int = 0,
    warmup: config_mod.WarmupSettings | None = None,
    templates: Sequence[config_mod.TemplateConfig] = (),
) -> Cluster:
    """A server on ``engines`` (stopped by ``stack``)."""
    config = server_config(
        settings, engines, routing=routing, extproc_port=extproc_port, warmup=warmup, templates=templates
    )
    server = Server(config)
    stack.push_async_callback(server.stop, 0.1)
    addresses = await server.start()
    channel = grpc.aio.insecure_channel(addresses.grpc)
    stack.push_async_callback(channel.close)
    return Cluster(engines, server, session, pb_grpc.InferenceCacheStub(channel), settings.block_size)


async def start_cluster(settings: DemoSettings, stack: contextlib.AsyncExitStack) -> Cluster:
    """Engines and a cache-aware server on them, no Envoy (the integration tests' cluster)."""
    engines = await start_engines(settings, stack)
    session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
    return await attach_server(settings, engines, session, stack)


# -- the run ------------------------------------------------------------------------------------


def _say(progress: TextIO, text: str) -> None:
    print(text, file=progress, flush=True)


@dataclass(frozen=True)
class Answer:
    engine_address: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    content: str


async def stream_chat(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]) -> Answer:
    """POST a streamed chat completion; time to the first content chunk, usage from the last."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    usage: Mapping[str, Any] | None = None
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                raise DemoError(f"{url}: HTTP {response.status}: {(await response.text())[:500]}")
            address = response.headers.get("x-engine-address", "")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                for choice in chunk.get("choices", ()):
                    if content := choice.get("delta", {}).get("content"):
                        ttft = time.perf_counter() - start if ttft is None else ttft
                        parts.append(content)
                usage = chunk.get("usage") or usage
    except aiohttp.ClientError as e:
        raise DemoError(f"{url}: {e}") from e
    if usage is None or ttft is None:
        raise DemoError(f"{url}: the stream ended without content or usage")
    return Answer(
        address, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], ttft, "".join(parts)
    )


async def wait_routable(session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
    """Until a request through Envoy (``GET /v1/models``: the picker answers bodiless requests
    on load alone, no cache is touched) reaches an engine."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            async with session.get(f"{url}/v1/models") as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except aiohttp.ClientError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise DemoError(f"Envoy at {url} did not route to an engine: {last}")
        await asyncio.sleep(0.05)


async def run_workload(
    cluster: Cluster,
    settings: DemoSettings,
    workload: demo_workload.Workload,
    url: str,
    routing: str,
    progress: TextIO,
) -> Run:
    """Send the workload through Envoy (``url``), one streamed request at a time."""
    run = Run(routing, list(cluster.engines))
    names = {cluster.address(n): n for n in cluster.engines}
    history: dict[str, list[Message]] = {}
    render = next(iter(cluster.engines))
    steps: list[tuple[Step, bool]] = [(s, False) for s in workload.first] + [
        (s, True) for s in workload.follow_ups
    ]
    for i, (step, follow_up) in enumerate(steps, start=1):
        messages = [*history.get(step.conversation, []), *step.messages]
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": role, "content": content} for role, content in messages],
            "max_tokens": settings.max_tokens,
        }
        rendered = await cluster.post(render, "/v1/chat/completions/render", body)
        held = {name: cluster.held(name, rendered["token_ids"]) for name in cluster.engines}
        answer = await stream_chat(cluster.session, f"{url}/v1/chat/completions", body)
        if answer.engine_address not in names:
            raise DemoError(f"{step.label}: answered by {answer.engine_address!r}, not one of the engines")
        history[step.conversation] = [*messages, ("assistant", answer.content)]
        row = Row(
            step.label,
            follow_up,
            answer.prompt_tokens,
            held,
            names[answer.engine_address],
            answer.cached_tokens,
            answer.ttft_s,
        )
        run.rows.append(row)
        mark = ("  ok" if row.landed else "  MISSED") if follow_up and routing == MODES[0] else ""
        _say(
            progress,
            f"  {routing} [{i:>3}/{len(steps)}] {row.label:<14} -> {row.sent_to} "
            f"cached {row.cached_tokens:>5}/{row.prompt_tokens:<5} TTFT {1e3 * row.ttft_s:6.1f} ms{mark}",
        )
    return run


async def run_templated(
    cluster: Cluster,
    settings: DemoSettings,
    workload: demo_workload.Workload,
    url: str,
    routing: str,
    progress: TextIO,
) -> list[Row]:
    """Ask each template its questions through Envoy (``url``), one streamed request at a
    time; the ground truth renders the template as the server does."""
    names = {cluster.address(n): n for n in cluster.engines}
    specs = {name: render.TemplateSpec.from_dict(spec) for name, spec in workload.templates}
    engine = next(iter(cluster.engines))
    rows = []
    for i, step in enumerate(workload.templated, start=1):
        variables = {"question": step.question}
        messages = render.render(specs[step.template], variables).messages
        assert messages is not None  # the demo's templates are chat templates
        plain = {
            "model": MODEL,
            "messages": [m.to_openai() for m in messages],
            "max_tokens": settings.max_tokens,
        }
        rendered = await cluster.post(engine, "/v1/chat/completions/render", plain)
        held = {name: cluster.held(name, rendered["token_ids"]) for name in cluster.engines}
        ref = f"{settings.tenant}/{step.template}"
        body = {
            "model": MODEL,
            "template": {"name": ref, "variables": variables},
            "max_tokens": settings.max_tokens,
        }
        answer = await stream_chat(cluster.session, f"{url}/v1/chat/completions", body)
        if answer.engine_address not in names:
            raise DemoError(f"{step.label}: answered by {answer.engine_address!r}, not one of the engines")
        row = Row(
            step.label,
            not step.first,
            answer.prompt_tokens,
            held,
            names[answer.engine_address],
            answer.cached_tokens,
            answer.ttft_s,
            templated=True,
            template_first=step.first,
        )
        rows.append(row)
        mark = ""
        if step.first:
            mark = "  hit" if row.landed and row.cached_tokens else "  cold"
        elif routing == MODES[0]:
            mark = "  ok" if row.landed else "  MISSED"
        _say(
            progress,
            f"  {routing} [{i:>3}/{len(workload.templated)}] {row.label:<14} -> {row.sent_to} "
            f"cached {row.cached_tokens:>5}/{row.prompt_tokens:<5} TTFT {1e3 * row.ttft_s:6.1f} ms{mark}",
        )
    return rows


async def prepare_templates(
    cluster: Cluster, settings: DemoSettings, workload: demo_workload.Workload
) -> None:
    """Push the workload's templates; with the warm-up on, wait until it has pre-filled
    them and the index has applied the engines' events."""
    stored = [templates_mod.build(settings.tenant, name, spec) for name, spec in workload.templates]
    await cluster.put_templates(stored)
    if cluster.server.warmer is not None:
        await asyncio.wait_for(cluster.server.warmer.settled(), settings.sync_timeout_s)
        await cluster.wait_ingested(settings.sync_timeout_s)


@dataclass
class Report:
    engines: Sequence[str]
    envoy: str
    runs: list[Run] = field(default_factory=list)
    warmup: bool = False


async def run_demo(settings: DemoSettings, progress: TextIO) -> Report:
    workload = demo_workload.generate(settings.workload)
    config = envoy.load_config(_locate(settings.envoy_config))
    async with contextlib.AsyncExitStack() as stack:
        _say(progress, f"starting {settings.engines} fake engines (tokenizer {settings.tokenizer})")
        engines = await start_engines(settings, stack)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )
        report = Report(
            engines=[f"{n}=127.0.0.1:{r.port}" for n, r in engines.items()], envoy="", warmup=settings.warmup
        )
        warm = config_mod.WarmupSettings(enabled=True) if settings.warmup else None
        proxy: envoy.EnvoyProcess | None = None
        extproc_port = 0
        for routing in MODES:
            async with contextlib.AsyncExitStack() as server_stack:
                cluster = await attach_server(
                    settings,
                    engines,
                    session,
                    server_stack,
                    routing=routing,
                    extproc_port=extproc_port,
                    warmup=warm,
                )
                assert cluster.server.addresses is not None
                extproc = cluster.server.addresses.extproc
                extproc_port = int(extproc.rpartition(":")[2])
                _say(progress, f"server: routing {routing}, ext_proc on {extproc}")
                if proxy is None:
                    proxy = await stack.enter_async_context(
                        envoy.EnvoyProcess(envoy.loopback(config, extproc=extproc), envoy=settings.envoy)
                    )
                    report.envoy = f"{proxy.url} ({settings.envoy_config.name}) -> ext_proc {extproc}"
                    _say(progress, f"envoy: {report.envoy}")
                await cluster.reset(settings.sync_timeout_s)
                await wait_routable(session, proxy.url, settings.sync_timeout_s)
                rows: list[Row] = []
                if workload.templated:
                    await prepare_templates(cluster, settings, workload)
                    state = "on" if settings.warmup else "off"
                    _say(
                        progress,
                        f"{routing}: {len(workload.templated)} templated requests "
                        f"({len(workload.templates)} templates, warm-up {state})",
                    )
                    rows = await run_templated(cluster, settings, workload, proxy.url, routing, progress)
                _say(
                    progress,
                    f"{routing}: {len(workload.first)} first turns, {len(workload.follow_ups)} follow-ups",
                )
                run = await run_workload(cluster, settings, workload, proxy.url, routing, progress)
                run.rows[:0] = rows
                report.runs.append(run)
        _say(progress, "stopping")
    return report


def _locate(path: Path) -> Path:
    """A repository-relative path, from the repository or the working directory."""
    if path.is_absolute():
        return path
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / path).is_file():
            return root / path
    raise DemoError(f"{path}: not found (run the demo from the repository)")


def format_report(report: Report) -> str:
    aware, baseline = report.runs
    lines = [f"engines: {', '.join(report.engines)}", f"envoy:   {report.envoy}", ""]
    head = f"{'follow-up':<15}{'prompt':>7}  " + "  ".join(
        f"{run.routing + ': holder':<20}{'sent to':<8}{'cached':>6}{'TTFT ms':>9}" for run in report.runs
    )
    lines += [head, "-" * len(head)]
    for a, b in zip(aware.follow_ups, baseline.follow_ups, strict=True):
        cells = []
        for r in (a, b):
            holder = f"{','.join(r.holders)} ({r.best})" if r.best else "-"
            cells.append(f"{holder:<20}{r.sent_to:<8}{r.cached_tokens:>6}{1e3 * r.ttft_s:>9.1f}")
        lines.append(
            f"{a.label:<15}{a.prompt_tokens:>7}  " + "  ".join(cells) + ("" if a.landed else "  MISSED")
        )
    lines.append("")
    width = 22
    rows = [
        ("", [run.routing for run in report.runs]),
        (
            "requests per engine",
            [" ".join(f"{n}:{c}" for n, c in run.per_engine().items()) for run in report.runs],
        ),
        ("prompt tokens", [f"{run.prompt_tokens:,}" for run in report.runs]),
        ("cached tokens", [f"{run.cached_tokens:,}" for run in report.runs]),
        ("hit ratio", [f"{100 * run.hit_ratio:.1f}%" for run in report.runs]),
        ("TTFT p50 / p90", ["{:.1f} / {:.1f} ms".format(*run.ttft_ms()) for run in report.runs]),
        (
            "follow-ups on holder",
            [f"{run.landed}/{len(run.follow_ups)}" for run in report.runs],
        ),
        ("templated hit ratio", [f"{100 * run.templated_hit_ratio:.1f}%" for run in report.runs]),
        ("template first hits", [f"{run.first_hits}/{len(run.template_firsts)}" for run in report.runs]),
    ]
    col = max(len(v) for _, values in rows for v in values) + 2
    lines += [f"{label:<{width}}" + "".join(f"{v:<{col}}" for v in values).rstrip() for label, values in rows]
    result = verdict(aware, baseline, warmup=report.warmup)
    lines.append("")
    if result.ok:
        firsts = (
            f"; with the warm-up on, every template's first request hit ({aware.first_hits}/"
            f"{len(aware.template_firsts)})"
            if report.warmup and aware.template_firsts
            else ""
        )
        lines.append(
            f"PASS: cache-aware hit ratio {100 * aware.hit_ratio:.1f}% > round robin "
            f"{100 * baseline.hit_ratio:.1f}%; every cache-aware follow-up "
            f"({aware.landed}/{len(aware.follow_ups)}) landed on the engine holding its prefix{firsts}"
        )
    else:
        lines += [f"FAIL: {reason}" for reason in result.reasons]
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
        help="KV blocks per engine (default: 96 with the Qwen tokenizer, 320 with any other: "
        "the tiny test tokenizer makes ~3x more tokens of the same text)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--conversations", type=int, default=12, help="multi-turn chats")
    p.add_argument("--turns", type=int, default=4, help="turns per chat")
    p.add_argument("--rag-requests", type=int, default=12, help="requests sharing retrieved documents")
    p.add_argument("--templates", type=int, default=2, help="PromptTemplates of the templated requests")
    p.add_argument("--template-requests", type=int, default=3, help="questions asked of each template")
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="do not pre-fill the templates' stable prefixes (the warm-up is on by default)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the workload (default 0)")
    p.add_argument(
        "--matching",
        choices=config_mod.MATCHING_MODES,
        default="auto",
        help="how the server matches requests (models[].matching; default auto)",
    )
    p.add_argument(
        "--envoy",
        metavar="PATH",
        help="Envoy binary (default: $INFERENCE_CACHE_ENVOY, "
        f"{envoy.ENVOY_RELPATH} from 'make envoy', else envoy on PATH)",
    )


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    tokenizer = args.tokenizer or default_tokenizer()
    if tokenizer is None:
        raise DemoError(
            f"no tokenizer: run 'make tokenizer' (writes {QWEN_TOKENIZER}) or pass --tokenizer DIR"
        )
    if not (tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer).is_file():
        raise DemoError(f"{tokenizer}: no tokenizer.json there")
    if (
        args.engines < 1
        or args.turns < 1
        or min(args.conversations, args.rag_requests, args.templates, args.template_requests) < 0
    ):
        raise DemoError(
            "--engines and --turns must be >= 1; --conversations, --rag-requests, --templates "
            "and --template-requests >= 0"
        )
    try:
        binary = args.envoy or envoy.find_envoy()
    except envoy.EnvoyError as e:
        raise DemoError(str(e)) from e
    if not os.access(binary, os.X_OK):
        raise DemoError(f"--envoy {binary}: not an executable; run 'make envoy'")
    return DemoSettings(
        tokenizer=tokenizer,
        engines=args.engines,
        num_gpu_blocks=args.num_gpu_blocks or (96 if tokenizer == QWEN_TOKENIZER else 320),
        block_size=args.block_size,
        seed=args.seed,
        matching=args.matching,
        workload=WorkloadSettings(
            seed=args.seed,
            conversations=args.conversations,
            turns=args.turns,
            rag_requests=args.rag_requests,
            templates=args.templates,
            template_requests=args.template_requests,
        ),
        envoy=binary,
        warmup=args.warmup,
    )


async def main(args: argparse.Namespace, out: TextIO, progress: TextIO) -> int:
    """The whole subcommand on a running loop (tests await it): 0 when cache-aware routing
    passed (see :func:`verdict`), 1 otherwise or on a failure."""
    try:
        settings = settings_from_args(args)
        if settings.tokenizer == TINY_TOKENIZER and args.tokenizer is None:
            _say(
                progress,
                f"note: {QWEN_TOKENIZER} not found ('make tokenizer'); using the tiny test tokenizer",
            )
        report = await run_demo(settings, progress)
    except (DemoError, envoy.EnvoyError) as e:
        _say(progress, f"demo failed: {e}")
        return 1
    print(format_report(report), file=out, flush=True)
    return 0 if verdict(*report.runs, warmup=report.warmup).ok else 1


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(main(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        _say(sys.stderr, "interrupted; everything started was stopped")
        return 130
