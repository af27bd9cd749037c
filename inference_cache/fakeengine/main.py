"""``inference-cache fake-engine``: flags, assembly and the process lifetime.

Owner: ``inference_cache.fakeengine``; the ``cli`` dispatches here. :func:`start` wires the
tokenizer, the block hasher, the prefix cache, the KV-events publisher, the time model and
the HTTP app into one running replica; tests call it directly (port 0, injected clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from aiohttp import web

from inference_cache.fakeengine import app, events, versions
from inference_cache.fakeengine.hashing import HASH_ALGOS, BlockHasher, HashAlgo, LoRA
from inference_cache.fakeengine.prefix_cache import PrefixCache
from inference_cache.fakeengine.publisher import PublisherSettings, ZmqPublisher
from inference_cache.fakeengine.scheduler import PREFILL_SHARING, Clock, Engine, LoopClock, TimeModel
from inference_cache.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    tokenizer: Path
    """A directory with ``tokenizer.json`` (+ ``tokenizer_config.json``) or the file itself."""
    model: str = "fake-model"
    host: str = "127.0.0.1"
    port: int = 8000
    chat_template: Path | None = None
    block_size: int = 16
    num_gpu_blocks: int = 4096
    max_model_len: int = 4096
    kv_events_endpoint: str | None = None
    kv_events_topic: str = ""
    replay_endpoint: str | None = None
    buffer_steps: int = 10000
    vllm_version: versions.Version = (0, 33, 0)
    hash_algo: HashAlgo = "sha256"
    python_hash_seed: str | None = None
    """``PYTHONHASHSEED`` of the emulated engine; ``None`` = unset."""
    time_model: TimeModel = field(default_factory=TimeModel)
    data_parallel_rank: int = 0
    lora_modules: tuple[tuple[str, str], ...] = ()
    """``(name, path)`` pairs; adapter ids are 1, 2, ... in this order."""


@dataclass
class Running:
    """A started replica; :meth:`close` stops everything :func:`start` started."""

    config: EngineConfig
    state: app.State
    runner: web.AppRunner
    port: int

    @property
    def engine(self) -> Engine:
        return self.state.engine

    @property
    def publisher(self) -> ZmqPublisher | None:
        return self.state.publisher

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()
        if self.state.publisher is not None:
            await self.state.publisher.close()


async def start(
    config: EngineConfig,
    *,
    clock: Clock | None = None,
    zmq_context: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> Running:
    tokenizer = PromptTokenizer.load(config.tokenizer, config.chat_template)
    hasher = BlockHasher.create(
        config.hash_algo, config.python_hash_seed, config.block_size, config.vllm_version
    )
    cache = PrefixCache(num_gpu_blocks=config.num_gpu_blocks, hasher=hasher)
    clock = clock or LoopClock()
    publisher: ZmqPublisher | None = None
    if config.kv_events_endpoint:
        publisher = ZmqPublisher(
            PublisherSettings(
                endpoint=config.kv_events_endpoint,
                replay_endpoint=config.replay_endpoint,
                topic=config.kv_events_topic,
                buffer_steps=config.buffer_steps,
                data_parallel_rank=config.data_parallel_rank,
                version=config.vllm_version,
            ),
            context=zmq_context,
        )
        await publisher.start()

    def sink(batch: list[events.Event]) -> None:
        if publisher is not None:
            payload = events.encode_batch(config.vllm_version, clock.time(), batch, config.data_parallel_rank)
            publisher.publish(payload)

    engine = Engine(cache, config.time_model, sink=sink, clock=clock)
    loras = {name: LoRA(name, path, i) for i, (name, path) in enumerate(config.lora_modules, start=1)}
    cache_config = {
        "block_size": str(config.block_size),
        "enable_prefix_caching": "True",
        "num_gpu_blocks": str(config.num_gpu_blocks),
        "prefix_caching_hash_algo": config.hash_algo,
    }
    served = app.Served(config.model, config.max_model_len, loras, cache_config)
    state = app.State(served, tokenizer, engine, publisher)
    runner = web.AppRunner(app.build_app(state), access_log=None, handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        if publisher is not None:
            await publisher.close()
        raise
    return Running(config, state, runner, site.port)


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected NAME=PATH")
    return name, path


def _version(text: str) -> versions.Version:
    try:
        return versions.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    p.add_argument("--model", default="fake-model", help="served model name")
    p.add_argument("--tokenizer", type=Path, required=True, help="directory with tokenizer.json, or the file")
    p.add_argument(
        "--chat-template", type=Path, help="Jinja chat template file (overrides tokenizer_config.json)"
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument(
        "--num-gpu-blocks", type=int, default=4096, help="KV cache capacity in blocks (incl. null block)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="context length: prompt + max_tokens beyond it is refused with 400 (default 4096)",
    )
    p.add_argument("--kv-events-endpoint", help="ZMQ PUB endpoint, e.g. tcp://*:5557 (no events without it)")
    p.add_argument("--kv-events-topic", default="", help='topic frame of each KV-event message (default "")')
    p.add_argument("--replay-endpoint", help="ZMQ ROUTER endpoint for replay, e.g. tcp://*:5558")
    p.add_argument("--buffer-steps", type=int, default=10000, help="batches kept for replay")
    p.add_argument("--vllm-version", type=_version, default=(0, 33, 0), help="emulated vLLM (0.10.2 .. 0.33)")
    p.add_argument("--hash-algo", choices=HASH_ALGOS, default="sha256", help="--prefix-caching-hash-algo")
    p.add_argument("--python-hash-seed", help="PYTHONHASHSEED of the emulated engine (unset by default)")
    p.add_argument(
        "--prefill-tokens-per-second",
        type=float,
        default=10000.0,
        help="time model: uncached prompt tokens prefilled per second (default 10000)",
    )
    p.add_argument(
        "--decode-tokens-per-second",
        type=float,
        default=100.0,
        help="time model: output tokens per second of each request (default 100)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="time model: requests running at once; the rest wait in FIFO order (default 256)",
    )
    p.add_argument(
        "--prefill-sharing",
        choices=PREFILL_SHARING,
        default="independent",
        help="independent (default): concurrent prefills do not slow each other; fcfs: one "
        "engine-wide prefill queue in admission order, as on one GPU",
    )
    p.add_argument("--data-parallel-rank", type=int, default=0, help="offsets the ZMQ ports like vLLM")
    p.add_argument(
        "--lora-modules",
        type=_lora_module,
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="served LoRA adapters; their ids are 1, 2, ... in this order (default none)",
    )


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        tokenizer=args.tokenizer,
        model=args.model,
        host=args.host,
        port=args.port,
        chat_template=args.chat_template,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_model_len=args.max_model_len,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_topic=args.kv_events_topic,
        replay_endpoint=args.replay_endpoint,
        buffer_steps=args.buffer_steps,
        vllm_version=args.vllm_version,
        hash_algo=args.hash_algo,
        python_hash_seed=args.python_hash_seed,
        time_model=TimeModel(
            args.prefill_tokens_per_second,
            args.decode_tokens_per_second,
            args.max_num_seqs,
            args.prefill_sharing,
        ),
        data_parallel_rank=args.data_parallel_rank,
        lora_modules=tuple(args.lora_modules),
    )


async def _serve(config: EngineConfig) -> None:
    running = await start(config)
    publisher = running.publisher
    log.info(
        "fake engine %s on %s; kv events %s, replay %s",
        config.model,
        running.url,
        publisher.endpoint if publisher else "off",
        publisher.replay_endpoint if publisher else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        BlockHasher.create(config.hash_algo, config.python_hash_seed, config.block_size, config.vllm_version)
    except ValueError as e:
        log.error("%s", e)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))
    return 0
