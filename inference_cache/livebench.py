"""``inference-cache bench live``: real routers in front of real (fake-engine) processes on
loopback, the same workload through each, hit ratio from the engines and TTFT from the client.

Owner: the benchmarks (issue #6); registered by ``inference_cache.cli`` (``bench live``;
``make bench``). Per (router, workload, repeat) one run::

    load generator (aiohttp, C sessions in flight, streamed chat, a NEW connection per request)
      --> front: ours       = Envoy (examples/envoy/envoy-buffered.yaml via envoy.loopback)
                              --ext_proc--> `inference-cache serve` (own process)
                 round_robin = Envoy alone, ROUND_ROBIN over a STATIC cluster of the engines
                 sglang_cache_aware = sglang-router 0.3.2 --policy cache_aware
                 vllm_kv_aware / vllm_cache_aware = vllm-router 0.1.17 (kv_aware: the engines'
                              ZMQ KV events + /render; cache_aware: VLLM_ROUTER_TOKENIZER set)
      --> N `inference-cache fake-engine` processes (KV events; ``--prefill-sharing fcfs`` by
          default: concurrent prefills on one engine queue for its prefill, as on one GPU)

The engines run for the whole bench; every run starts a fresh front (the peers' trees and our
index start empty), waits until a probe request is answered through it, then empties every
engine's prefix cache (``/reset_prefix_cache``, retried while blocks are busy) before the
workload. Peers come from ``hack/peers.py`` (``.tools/peers/<name>``); a router whose binary
is missing is skipped and listed in the output.

Measured per request: the engine's ``usage.prompt_tokens_details.cached_tokens`` (the hit),
time to the first content chunk and to the end of the stream (client side, ``perf_counter``).
Streaming over a fresh connection per request avoids the keep-alive streaming stall measured
in sglang-router (``research/peers.md``). The *ideal* hit of a request is what a router that
always picks the engine holding the longest earlier prompt prefix would get with an unbounded
cache: the longest full-block common prefix with any earlier-sent prompt, capped one block
short as vLLM caps a hit (computed afterwards with the engines' tokenizer, untimed).

Load generator (``--load-generator``): ours (above) by default; ``inference-perf`` (its
``shared_prefix`` data generator, :mod:`inference_cache.inferenceperf`) drives the
shared-prefix workload instead when ``auto`` finds it installed (``hack/peers.py``, Python
3.12) or when asked for; multi-turn always uses ours. Each row's ``load_generator`` and
``client`` say which ran.

``--json OUT`` writes a top-level JSON array, one object per run (the convention of
``bench index``/``bench extproc``); a markdown table of medians over repeats is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from inference_cache import config as config_mod
from inference_cache import demo_workload, envoy, inferenceperf
from inference_cache import tokenizer as tokenizer_mod
from inference_cache.children import Child, free_port
from inference_cache.extproc import openai, picker
from inference_cache.extproc.bench import ServerProcess, without_extproc
from inference_cache.fakeengine.scheduler import PREFILL_SHARING, PrefillSharing

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = Path(".cache/tokenizers/qwen")
ENVOY_CONFIG = REPO / "examples" / "envoy" / "envoy-buffered.yaml"
PEERS_DIR = REPO / ".tools" / "peers"
ROUTERS = ("ours", "round_robin", "sglang_cache_aware", "vllm_kv_aware", "vllm_cache_aware")
WORKLOADS = ("shared_prefix", "multiturn")
#: The router whose TTFT p90 the others are divided by (the issue's target), when it ran.
REFERENCE_ROUTER = "sglang_cache_aware"
CLIENT_MODE = "streamed chat, stream_options.include_usage, a new TCP connection per request"
LOAD_GENERATOR = "own (aiohttp)"
LOAD_GENERATORS = ("auto", "ours", "inference-perf")
#: Demo-vocabulary words -> Qwen tokens (inference-perf sizes its prompts in tokens).
TOKENS_PER_WORD = 1.3
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0


class BenchError(Exception):
    """The bench could not run (the message says why)."""


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What every fake engine runs with (recorded in each JSON row)."""

    tokenizer: Path
    block_size: int = 16
    num_gpu_blocks: int = 8192
    max_model_len: int = 32768
    #: vllm-router kv_aware recomputes the engines' block hashes from ``/render`` tokens:
    #: vLLM's sha256_cbor with the default seed (PYTHONHASHSEED unset -> "vllm-none-hash").
    hash_algo: str = "sha256_cbor"
    python_hash_seed: str | None = None
    vllm_version: str = "0.33.0"
    prefill_tokens_per_second: float = 10_000.0
    decode_tokens_per_second: float = 100.0
    max_num_seqs: int = 256
    #: ``fcfs``: one prefill at a time per engine (a GPU's prefills compete, so load
    #: balancing counts); ``independent``: only the request path differs between routers.
    prefill_sharing: PrefillSharing = "fcfs"


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    """Sizes in words of the demo vocabulary (about 1.3 Qwen tokens per word)."""

    groups: int = 8
    questions: int = 6
    prefix_words: int = 1500
    question_words: int = 40
    sessions: int = 8
    turns: int = 4
    system_words: int = 400
    turn_words: int = 60


@dataclass(frozen=True, slots=True)
class Settings:
    engine: EngineSettings
    engines: int = 4
    routers: tuple[str, ...] = ROUTERS
    workloads: tuple[str, ...] = WORKLOADS
    shape: WorkloadShape = field(default_factory=WorkloadShape)
    concurrency: int = 4
    max_tokens: int = 8
    repeats: int = 1
    seed: int = 0
    peers_dir: Path = PEERS_DIR
    #: ``tcp`` (engines bind ``tcp://*:P``: vllm-router accepts only tcp://HOST:PORT) or ``ipc``.
    events: str = "tcp"
    #: One of :data:`LOAD_GENERATORS` (:func:`generator_for` resolves it per workload).
    load_generator: str = "auto"
    inference_perf: Path = inferenceperf.EXECUTABLE


def add_arguments(p: argparse.ArgumentParser) -> None:
    def names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
        def parse(text: str) -> tuple[str, ...]:
            out = tuple(x for x in text.split(",") if x)
            if bad := [x for x in out if x not in allowed]:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
            return out

        return parse

    p.add_argument("--json", metavar="OUT", type=Path, help="also write one object per run as JSON")
    p.add_argument("--routers", type=names(ROUTERS), default=ROUTERS, help=f"default {','.join(ROUTERS)}")
    p.add_argument(
        "--workloads", type=names(WORKLOADS), default=WORKLOADS, help="default shared_prefix,multiturn"
    )
    p.add_argument("--engines", type=int, default=4, help="fake engines (default 4)")
    p.add_argument("--concurrency", type=int, default=4, help="requests (sessions) in flight (default 4)")
    p.add_argument("--repeats", type=int, default=1, help="runs per (router, workload); medians reported")
    p.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (default 8)")
    p.add_argument("--groups", type=int, default=8, help="shared_prefix: prefix groups (default 8)")
    p.add_argument("--questions", type=int, default=6, help="shared_prefix: questions per group (default 6)")
    p.add_argument("--prefix-words", type=int, default=1500, help="shared_prefix: words per prefix")
    p.add_argument("--sessions", type=int, default=8, help="multiturn: conversations (default 8)")
    p.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation (default 4)")
    p.add_argument("--num-gpu-blocks", type=int, default=8192, help="KV blocks per engine (default 8192)")
    p.add_argument("--tokenizer", type=Path, default=QWEN_TOKENIZER, help=f"default {QWEN_TOKENIZER}")
    p.add_argument(
        "--prefill-sharing",
        choices=PREFILL_SHARING,
        default="fcfs",
        help="the engines' prefill model: fcfs (default) = one prefill at a time per engine, in "
        "admission order; independent = concurrent prefills do not slow each other",
    )
    p.add_argument(
        "--peers-dir", type=Path, default=PEERS_DIR, help="where hack/peers.py installed the peers"
    )
    p.add_argument(
        "--events",
        choices=("tcp", "ipc"),
        default=None,
        help="KV-event transport (default: tcp when a vllm router runs)",
    )
    p.add_argument(
        "--load-generator",
        choices=LOAD_GENERATORS,
        default="auto",
        help="shared_prefix client: auto (default) = inference-perf when installed, else ours; "
        "multiturn always uses ours",
    )
    p.add_argument(
        "--inference-perf",
        type=Path,
        default=inferenceperf.EXECUTABLE,
        help="the inference-perf executable (hack/peers.py installs it)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the workload (default 0)")


def generator_for(settings: Settings, workload: str) -> str:
    """``ours`` or ``inference-perf``: the client that drives ``workload``."""
    if workload != "shared_prefix" or settings.load_generator == "ours":
        return "ours"
    if settings.load_generator == "auto" and not inferenceperf.installed(settings.inference_perf):
        return "ours"
    return "inference-perf"


def settings_from_args(args: argparse.Namespace) -> Settings:
    if min(args.engines, args.concurrency, args.repeats, args.max_tokens, args.groups, args.questions) < 1:
        raise BenchError(
            "--engines, --concurrency, --repeats, --max-tokens, --groups, --questions must be >= 1"
        )
    if min(args.sessions, args.turns) < 1:
        raise BenchError("--sessions and --turns must be >= 1")
    if not (args.tokenizer / "tokenizer.json").is_file():
        raise BenchError(f"{args.tokenizer}: no tokenizer.json there (run `make tokenizer`)")
    events = args.events or ("tcp" if any(r.startswith("vllm_") for r in args.routers) else "ipc")
    if args.load_generator == "inference-perf" and not inferenceperf.installed(args.inference_perf):
        raise BenchError(f"{args.inference_perf} missing: run `python hack/peers.py inference-perf`")
    return Settings(
        engine=EngineSettings(
            tokenizer=args.tokenizer.resolve(),
            num_gpu_blocks=args.num_gpu_blocks,
            prefill_sharing=args.prefill_sharing,
        ),
        engines=args.engines,
        routers=args.routers,
        workloads=args.workloads,
        shape=replace(
            WorkloadShape(),
            groups=args.groups,
            questions=args.questions,
            prefix_words=args.prefix_words,
            sessions=args.sessions,
            turns=args.turns,
        ),
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        seed=args.seed,
        peers_dir=args.peers_dir.resolve(),
        events=events,
        load_generator=args.load_generator,
        inference_perf=args.inference_perf,
    )


# -- workloads (pure) ---------------------------------------------------------------------------

Message = dict[str, str]
Session = list[list[Message]]
"""One session = its turns; each turn = the messages it appends (the replies are appended by
the driver after each answer)."""


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(demo_workload.WORDS) for _ in range(words))


def sessions(workload: str, shape: WorkloadShape, seed: int) -> list[Session]:
    """The workload as sessions. ``shared_prefix``: ``groups`` long system prompts, each with
    ``questions`` one-turn sessions, shuffled (llm-d's shape); ``multiturn``: ``sessions``
    conversations of ``turns`` turns on one of three system prompts."""
    rng = random.Random(f"{workload}-{seed}")
    if workload == "shared_prefix":
        prefixes = [f"Context {g}.\n{_text(rng, shape.prefix_words)}" for g in range(shape.groups)]
        out: list[Session] = [
            [
                [
                    {"role": "system", "content": p},
                    {"role": "user", "content": _text(rng, shape.question_words) + "?"},
                ]
            ]
            for p in prefixes
            for _ in range(shape.questions)
        ]
        rng.shuffle(out)
        return out
    if workload == "multiturn":
        systems = [f"{persona}\n{_text(rng, shape.system_words)}" for persona in demo_workload.PERSONAS]
        return [
            [
                [
                    {"role": "system", "content": systems[s % len(systems)]},
                    {"role": "user", "content": f"Session {s}. {_text(rng, shape.turn_words)}?"},
                ],
                *(
                    [{"role": "user", "content": _text(rng, shape.turn_words) + "?"}]
                    for _ in range(shape.turns - 1)
                ),
            ]
            for s in range(shape.sessions)
        ]
    raise BenchError(f"unknown workload {workload!r}")


def ideal_cached(prompts: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """Per prompt (in send order): the longest full-block prefix shared with any earlier
    prompt, capped one block short of the prompt (vLLM recomputes the last token)."""
    seen: set[tuple[int, ...]] = set()
    out: list[int] = []
    for tokens in prompts:
        cap = (len(tokens) - 1) // block_size
        blocks = 0
        while blocks < cap and tuple(tokens[: (blocks + 1) * block_size]) in seen:
            blocks += 1
        out.append(blocks * block_size)
        for b in range(1, len(tokens) // block_size + 1):
            seen.add(tuple(tokens[: b * block_size]))
    return out


# -- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Engine:
    url: str
    address: str
    events_bind: str
    """The endpoint the engine's PUB socket binds."""
    events_connect: str
    """Where subscribers connect."""


def engine_command(settings: Settings, port: int, events: str) -> list[str]:
    e = settings.engine
    cmd = [
        sys.executable, "-m", "inference_cache", "fake-engine",
        "--host", envoy.LOOPBACK, "--port", str(port), "--model", MODEL,
        "--tokenizer", str(e.tokenizer), "--block-size", str(e.block_size),
        "--num-gpu-blocks", str(e.num_gpu_blocks), "--max-model-len", str(e.max_model_len),
        "--hash-algo", e.hash_algo, "--vllm-version", e.vllm_version,
        "--prefill-tokens-per-second", str(e.prefill_tokens_per_second),
        "--decode-tokens-per-second", str(e.decode_tokens_per_second),
        "--max-num-seqs", str(e.max_num_seqs), "--prefill-sharing", e.prefill_sharing,
        "--kv-events-endpoint", events,
    ]  # fmt: skip
    if e.python_hash_seed is not None:
        cmd += ["--python-hash-seed", e.python_hash_seed]
    return cmd


async def _poll(
    what: str, probe: Callable[[], Any], alive: Callable[[], bool], tail: Callable[[], str]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"{what} exited:\n{tail()}")
        try:
            if await probe():
                return
        except (aiohttp.ClientError, OSError) as exc:
            last = str(exc)
        await asyncio.sleep(0.1)
    raise BenchError(f"{what} did not become ready in {START_TIMEOUT_S:g} s ({last}):\n{tail()}")


async def start_engines(
    settings: Settings, workdir: Path, session: aiohttp.ClientSession, stack: contextlib.AsyncExitStack
) -> list[Engine]:
    engines: list[Engine] = []
    children: list[Child] = []
    for i in range(settings.engines):
        port = free_port()
        if settings.events == "tcp":
            ev_port = free_port()
            bind, connect = f"tcp://*:{ev_port}", f"tcp://{envoy.LOOPBACK}:{ev_port}"
        else:
            bind = connect = f"ipc://{workdir}/e{i}-events"
        child = Child(f"engine {i}", engine_command(settings, port, bind), workdir / f"engine{i}.log")
        stack.push_async_callback(child.stop)
        await child.start()
        children.append(child)
        engines.append(Engine(f"http://{envoy.LOOPBACK}:{port}", f"{envoy.LOOPBACK}:{port}", bind, connect))
    for engine, child in zip(engines, children, strict=True):

        async def healthy(url: str = engine.url) -> bool:
            async with session.get(url + "/health") as resp:
                return resp.status == 200

        await _poll(child.name, healthy, child.alive, child.tail)
    return engines


async def reset_caches(session: aiohttp.ClientSession, engines: Sequence[Engine]) -> None:
    """Empty every engine's prefix cache (409 = blocks still held: retried)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for engine in engines:
        while True:
            async with session.post(engine.url + "/reset_prefix_cache") as resp:
                if resp.status == 200:
                    break
                if resp.status != 409 or time.monotonic() > deadline:
                    raise BenchError(f"{engine.url}/reset_prefix_cache: HTTP {resp.status}")
            await asyncio.sleep(0.05)


# -- fronts -------------------------------------------------------------------------------------


def peer_binary(settings: Settings, peer: str, script: str) -> Path:
    path = settings.peers_dir / peer / "bin" / script
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} missing: run `python hack/peers.py {peer}`")
    return path


def peer_command(
    settings: Settings, router: str, engines: Sequence[Engine], port: int, metrics_port: int
) -> tuple[list[str], dict[str, str]]:
    """The peer router's command line and extra environment."""
    urls = [e.url for e in engines]
    common = ["--host", envoy.LOOPBACK, "--port", str(port), "--worker-urls", *urls]
    prometheus = ["--prometheus-host", envoy.LOOPBACK, "--prometheus-port", str(metrics_port)]
    tok = str(settings.engine.tokenizer)
    if router == "sglang_cache_aware":
        exe = peer_binary(settings, "sglang-router", "sglang-router")
        cmd = [str(exe), "launch", *common, "--policy", "cache_aware", *prometheus, "--tokenizer-path", tok]
        return cmd, {}
    exe = peer_binary(settings, "vllm-router", "vllm-router")
    if router == "vllm_kv_aware":
        sources = [x for e in engines for x in ("--kv-event-source", f"{e.url}={e.events_connect}")]
        kv = [*sources, "--kv-event-model", MODEL, "--kv-event-block-size", str(settings.engine.block_size)]
        return [str(exe), *common, "--policy", "kv_aware", *kv, *prometheus], {"VLLM_ROUTER_TOKENIZER": tok}
    if router == "vllm_cache_aware":
        return [str(exe), *common, "--policy", "cache_aware", *prometheus], {"VLLM_ROUTER_TOKENIZER": tok}
    raise BenchError(f"{router} is not a peer router")


def our_server_config(settings: Settings, engines: Sequence[Engine]) -> dict[str, Any]:
    return {
        "server": config_mod.ServerSettings.loopback(log_format="json").file_section(),
        "models": [
            {
                "name": MODEL,
                "block_size": settings.engine.block_size,
                "tokenizer": str(settings.engine.tokenizer),
            }
        ],
        "endpoints": [
            {
                "address": e.address,
                "model": MODEL,
                "kv_events": e.events_connect,
                "metrics_url": e.url + "/metrics",
            }
            for e in engines
        ],
        "stats_interval_s": 1.0,
    }


@dataclass(frozen=True, slots=True)
class Front:
    url: str
    alive: Callable[[], bool]
    tail: Callable[[], str]


@contextlib.asynccontextmanager
async def front(
    settings: Settings, router: str, engines: Sequence[Engine], workdir: Path
) -> AsyncIterator[Front]:
    """Start ``router`` in front of ``engines``; yield where to send requests; stop it."""
    async with contextlib.AsyncExitStack() as stack:
        if router == "ours":
            config_path = workdir / "serve.yaml"
            config_path.write_text(yaml.safe_dump(our_server_config(settings, engines)))
            server = await stack.enter_async_context(ServerProcess(config_path, pin=False, profile=None))
            cfg = envoy.loopback(envoy.load_config(ENVOY_CONFIG), extproc=server.addresses["extproc_addr"])
            proxy = await stack.enter_async_context(envoy.EnvoyProcess(cfg))
            yield Front(proxy.url, lambda: True, lambda: f"{server.log_tail()}\n{proxy.log_tail()}")
        elif router == "round_robin":
            shipped = envoy.load_config(ENVOY_CONFIG)
            cfg = envoy.loopback(
                without_extproc(shipped), extproc=f"{envoy.LOOPBACK}:1", engines=[e.address for e in engines]
            )
            proxy = await stack.enter_async_context(envoy.EnvoyProcess(cfg))
            yield Front(proxy.url, lambda: True, proxy.log_tail)
        else:
            port = free_port()
            cmd, env = peer_command(settings, router, engines, port, free_port())
            child = Child(router, cmd, workdir / f"{router}.log", env)
            stack.push_async_callback(child.stop)
            await child.start()
            yield Front(f"http://{envoy.LOOPBACK}:{port}", child.alive, child.tail)


# -- driving ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    order: int
    """Send order (over the whole run)."""
    body: bytes
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    engine: str | None = None
    error: str | None = None
    path: str = CHAT_PATH


def chat_body(messages: Sequence[Message], max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def send(url: str, body: bytes, result: Result) -> str:
    """One streamed chat over a new connection; fills ``result``; -> the reply text."""
    reply: list[str] = []
    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(force_close=True, limit=1)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(url + CHAT_PATH, data=body, headers={"content-type": "application/json"}) as resp,
    ):
        result.engine = resp.headers.get("x-engine-address")
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return ""
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or ():
                if text := (choice.get("delta") or {}).get("content"):
                    if not reply:
                        result.ttft_s = time.perf_counter() - t0
                    reply.append(text)
            if usage := chunk.get("usage"):
                result.prompt_tokens = usage.get("prompt_tokens", 0)
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
    result.latency_s = time.perf_counter() - t0
    if not reply:
        result.error = "no content in the stream"
    return "".join(reply)


async def drive(url: str, work: Sequence[Session], concurrency: int, max_tokens: int) -> list[Result]:
    """``concurrency`` workers, each taking the next session and running its turns in order
    (each turn re-sends the whole conversation plus the reply)."""
    results: list[Result] = []
    queue = iter(work)

    async def worker() -> None:
        for turns in queue:
            history: list[Message] = []
            for turn in turns:
                history += turn
                result = Result(len(results), chat_body(history, max_tokens))
                results.append(result)
                try:
                    reply = await send(url, result.body, result)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                if result.error:
                    break
                history.append({"role": "assistant", "content": reply})

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return results


async def drive_inference_perf(
    settings: Settings, url: str, workdir: Path, tag: str, repeat: int
) -> tuple[list[Result], float]:
    """The shared-prefix workload's shape (groups, questions, sizes in tokens) sent by
    inference-perf; -> its per-request report as results (no engine address: it keeps no
    response headers, so ``imbalance_max_mean`` is empty) and the seconds from the first
    request's start to the last one's end (its start-up is not counted)."""
    shape = settings.shape
    load = inferenceperf.Load(
        url=url,
        model=MODEL,
        tokenizer=settings.engine.tokenizer,
        groups=shape.groups,
        questions=shape.questions,
        prefix_tokens=inferenceperf.shape_in_tokens(shape.prefix_words, TOKENS_PER_WORD),
        question_tokens=inferenceperf.shape_in_tokens(shape.question_words, TOKENS_PER_WORD),
        max_tokens=settings.max_tokens,
        concurrency=settings.concurrency,
        seed=settings.seed + repeat,
        report_dir=workdir / f"inference-perf-{tag}",
    )
    try:
        records = await inferenceperf.run(
            load,
            workdir / f"inference-perf-{tag}.yaml",
            workdir / f"inference-perf-{tag}.log",
            settings.inference_perf,
        )
    except inferenceperf.InferencePerfError as exc:
        raise BenchError(str(exc)) from exc
    span = max((r.start + r.latency_s for r in records), default=0.0) - min(
        (r.start for r in records), default=0.0
    )
    results = [
        Result(
            order=i,
            body=r.body,
            prompt_tokens=r.prompt_tokens,
            cached_tokens=r.cached_tokens,
            ttft_s=r.ttft_s,
            latency_s=r.latency_s,
            error=r.error,
            path=inferenceperf.PATH,
        )
        for i, r in enumerate(records)
    ]
    return results, span


async def ready(url: str) -> bool:
    result = Result(0, chat_body([{"role": "user", "content": "ready?"}], 1))
    with contextlib.suppress(TimeoutError, ValueError):
        await send(url, result.body, result)
    return result.error is None and result.prompt_tokens > 0


# -- summarising --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise(
    router: str,
    workload: str,
    repeat: int,
    settings: Settings,
    results: Sequence[Result],
    ideal: Sequence[int],
    generator: str = "ours",
) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ideal_cached = sum(i for r, i in zip(results, ideal, strict=True) if r.error is None)
    per_engine: dict[str, int] = {}
    for r in ok:
        if r.engine:
            per_engine[r.engine] = per_engine.get(r.engine, 0) + r.prompt_tokens - r.cached_tokens
    computed = [per_engine.get(e, 0) for e in per_engine] + [0] * max(0, settings.engines - len(per_engine))
    ttft = [r.ttft_s * 1e3 for r in ok]
    lat = [r.latency_s * 1e3 for r in ok]
    e = settings.engine
    return {
        "router": router,
        "workload": workload,
        "repeat": repeat,
        "engines": settings.engines,
        "concurrency": settings.concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_ratio": round(cached / prompt, 4) if prompt else 0.0,
        "ideal_hit_ratio": round(ideal_cached / prompt, 4) if prompt else 0.0,
        "hit_over_ideal": round(cached / ideal_cached, 4) if ideal_cached else None,
        "ttft_mean_ms": round(statistics.mean(ttft), 2) if ttft else float("nan"),
        "ttft_p50_ms": round(percentile(ttft, 0.5), 2),
        "ttft_p90_ms": round(percentile(ttft, 0.9), 2),
        "ttft_p99_ms": round(percentile(ttft, 0.99), 2),
        "latency_p50_ms": round(percentile(lat, 0.5), 2),
        "latency_p90_ms": round(percentile(lat, 0.9), 2),
        "imbalance_max_mean": (
            round(max(computed) / statistics.mean(computed), 3) if per_engine and sum(computed) else None
        ),
        "block_size": e.block_size,
        "num_gpu_blocks": e.num_gpu_blocks,
        "hash_algo": e.hash_algo,
        "python_hash_seed": e.python_hash_seed or "unset (NONE_HASH of 'vllm-none-hash')",
        "vllm_version": e.vllm_version,
        "prefill_tokens_per_s": e.prefill_tokens_per_second,
        "decode_tokens_per_s": e.decode_tokens_per_second,
        "prefill_sharing": e.prefill_sharing,
        "max_tokens": settings.max_tokens,
        "client": inferenceperf.CLIENT_MODE if generator == "inference-perf" else CLIENT_MODE,
        "load_generator": inferenceperf.DESCRIPTION if generator == "inference-perf" else LOAD_GENERATOR,
    }


def medians(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (router, workload): the median of each figure over the repeats, and
    ``ratio_ttft_p90_to_<reference>`` within the same workload."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["router"], r["workload"]), []).append(r)
    out: list[dict[str, Any]] = []
    for (router, workload), rs in groups.items():
        row: dict[str, Any] = {"router": router, "workload": workload, "repeats": len(rs)}
        for key in (
            "hit_ratio",
            "ideal_hit_ratio",
            "hit_over_ideal",
            "ttft_mean_ms",
            "ttft_p50_ms",
            "ttft_p90_ms",
            "ttft_p99_ms",
            "latency_p50_ms",
            "imbalance_max_mean",
        ):
            values = [r[key] for r in rs if r[key] is not None]
            row[key] = round(statistics.median(values), 4) if values else None
        row["errors"] = sum(r["errors"] for r in rs)
        out.append(row)
    for row in out:
        ref = next(
            (r for r in out if r["router"] == REFERENCE_ROUTER and r["workload"] == row["workload"]), None
        )
        ok = ref is not None and ref["ttft_p90_ms"] and row["ttft_p90_ms"] is not None
        row[f"ttft_p90_over_{REFERENCE_ROUTER}"] = (
            round(row["ttft_p90_ms"] / ref["ttft_p90_ms"], 3) if ok and ref else None
        )
    return out


#: What a reader of the generated table needs to know (``benchreport`` prints it under it).
NOTES = (
    "Fake engines (`inference-cache fake-engine`, one process each) behind each router in turn; "
    "every run starts a fresh router (ours: `inference-cache serve` + Envoy with "
    "`examples/envoy/envoy-buffered.yaml`; `round_robin`: the same Envoy without ext_proc, "
    "ROUND_ROBIN over the engines; sglang-router 0.3.2 `cache_aware`; vllm-router 0.1.17 "
    "`kv_aware` on the engines' ZMQ KV events and `cache_aware` with `VLLM_ROUTER_TOKENIZER`) "
    "and empties every engine's prefix cache first. Client (`load_generator`, `client`): ours, "
    + CLIENT_MODE
    + " (the keep-alive streaming stall of sglang-router is avoided); for shared_prefix, "
    "inference-perf's `shared_prefix` data generator instead when it is installed (`make bench` "
    "installs it with Python 3.12; it runs only there), the same groups, questions and sizes in "
    "tokens, streamed `/v1/completions` over its keep-alive pool, TTFT and latency from its "
    "per-request report (which keeps no response header, so `imbalance_max_mean` is empty). "
    "Hit = the engines' "
    "`cached_tokens` / prompt tokens; ideal = every prompt prefix cached after its first "
    "request (full blocks of earlier-sent prompts, capped one block short); multi-turn hits "
    "can exceed it by the cached blocks of earlier answers. TTFT is measured by the client to "
    "the first content chunk. The engines' time model (`prefill_sharing`): with `fcfs` each "
    "engine prefills one request at a time in admission order, at `prefill_tokens_per_s` "
    "(a GPU's prefills compete: a request routed behind another's uncached prompt waits for "
    "it), and decodes every request independently; TTFT therefore rewards both the cached "
    "prefix and the balance of prefill work, plus each router's request-path cost on this "
    "2-core machine. With `independent` (the fake engine's default) concurrent prefills do "
    "not slow each other and only the hit and the request-path cost differ. Every process "
    "(engines, router, client) shares the same 2 cores, unpinned: a router's CPU per request "
    "(ours, Envoy + `serve`: about 4.6-5 ms; sglang-router about 1.7 ms, measured from "
    "/proc schedstat) delays the engines and the next requests too, so these TTFTs include "
    "each stack's CPU cost on this machine (see 'Live: where ours spends its time under "
    "concurrency')."
)


def targets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Issue #6's live targets against median rows (:func:`medians`): for reading, never
    asserted."""
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by_router = {r["router"]: r for r in rows if r["workload"] == workload}
        ours = by_router.get("ours")
        if ours is None:
            continue
        met = ours["hit_ratio"] >= ours["ideal_hit_ratio"]
        out.append(
            f"{workload}: hit ratio equal to the ideal: {ours['hit_ratio']} vs {ours['ideal_hit_ratio']} "
            f"({'met' if met else 'NOT met'})"
        )
        if (ref := by_router.get(REFERENCE_ROUTER)) is not None and ref["ttft_p90_ms"]:
            ratio = ours["ttft_p90_ms"] / ref["ttft_p90_ms"]
            out.append(
                f"{workload}: TTFT p90 <= 0.9 x {REFERENCE_ROUTER}: {ours['ttft_p90_ms']} vs "
                f"{ref['ttft_p90_ms']} ms = {ratio:.2f}x ({'met' if ratio <= 0.9 else 'NOT met'})"
            )
    return out


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------


async def measure(settings: Settings, say: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run; -> (one row per run, routers skipped with the reason)."""
    tok = tokenizer_mod.PromptTokenizer.load(settings.engine.tokenizer)
    encoder = tokenizer_mod.CachedChatEncoder(tok)
    skipped: list[str] = []
    routers = []
    for router in settings.routers:
        try:
            if router not in ("ours", "round_robin"):
                peer_command(settings, router, [], 0, 0)
            routers.append(router)
        except FileNotFoundError as exc:
            skipped.append(f"{router}: {exc}")
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ic-livebench-")))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )
        engines = await start_engines(settings, workdir, session, stack)
        say(f"{len(engines)} fake engines: {', '.join(e.url for e in engines)} (events {settings.events})")
        for repeat in range(settings.repeats):
            for workload in settings.workloads:
                generator = generator_for(settings, workload)
                work = sessions(workload, settings.shape, settings.seed + repeat)
                for router in routers:
                    async with front(settings, router, engines, workdir) as running:
                        url = running.url
                        probe = functools.partial(ready, url)
                        await _poll(f"{router} at {url}", probe, running.alive, running.tail)
                        await reset_caches(session, engines)
                        if generator == "inference-perf":
                            tag = f"{workload}-{router}-{repeat}"
                            results, wall = await drive_inference_perf(settings, url, workdir, tag, repeat)
                        else:
                            t0 = time.monotonic()
                            results = await drive(url, work, settings.concurrency, settings.max_tokens)
                            wall = time.monotonic() - t0
                    prompts = [
                        picker.tokenize(encoder, openai.parse(r.path, r.body, openai.Limits()))
                        for r in results
                    ]
                    row = summarise(
                        router,
                        workload,
                        repeat,
                        settings,
                        results,
                        ideal_cached(prompts, settings.engine.block_size),
                        generator,
                    )
                    row["wall_s"] = round(wall, 2)
                    rows.append(row)
                    first_error = next((r.error for r in results if r.error), None)
                    say(
                        f"repeat {repeat} {workload} {router}: hit {row['hit_ratio']} "
                        f"(ideal {row['ideal_hit_ratio']}), "
                        f"TTFT p90 {row['ttft_p90_ms']} ms, errors {row['errors']}"
                        + (f" (first: {first_error})" if first_error else "")
                    )
    return rows, skipped


def run(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        settings = settings_from_args(args)
        rows, skipped = asyncio.run(measure(settings, say))
    except (BenchError, envoy.EnvoyError) as exc:
        say(f"bench live failed: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    summary = medians(rows)
    print(table(summary))
    for line in targets(summary):
        print(f"target {line}")
    for line in skipped:
        print(f"skipped {line}")
    for workload in settings.workloads:
        generator = generator_for(settings, workload)
        described = inferenceperf.DESCRIPTION if generator == "inference-perf" else LOAD_GENERATOR
        print(f"{workload}: load generator {described}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows and all(r["errors"] == 0 for r in rows) else 1
