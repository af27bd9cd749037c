"""``inference-cache subscribe``: the engine-pod sidecar (the original ``kvevent-subscriber``).

Owner: this module (composition root of the sidecar: flags, wiring, shutdown). Flow::

    vLLM ZMQ PUB --kvevents.Subscriber + Mapper (our fingerprints, in the pod)--> Producer
    vLLM GET /metrics --enginestats.StatsScraper (every --stats-interval)------> Producer
    Producer --ReportCacheState / PublishEvent--> inference-cache serve

Token ids never leave the pod: the mapper turns them into our 8-byte block keys here and
only keys, cumulative token counts and stats go over the wire.

Flags follow the original (seed inventory §5.5) with these differences:

- ``--topic`` defaults to ``""`` (every topic), matching vLLM's default publisher topic;
  the original defaulted to ``kv-events`` (its reference stack's configured topic).
- ``--hash-scheme`` accepts only ``vllm``: the in-pod mapper produces our content
  fingerprints, which is that scheme; the engine's own hashes are never forwarded.
- added: ``--replay-endpoint``, ``--block-size``, ``--kv-events-bind``,
  ``--lora-adapter-names id=name,...``, ``--token-file`` (producer auth) and
  ``--tls-ca-file``/``--tls-server-name`` (TLS to the server; plaintext by default);
  ``--engine-metrics-url ""`` disables the stats loop.

Exit codes: 0 after a graceful SIGTERM/SIGINT, 2 for invalid flags, 1 when ingestion dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from inference_cache import durations, enginestats, producer
from inference_cache.index import types
from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.index.kvevents.subscriber import Subscriber

logger = logging.getLogger(__name__)

#: Seconds the shutdown waits for the final flush and in-flight RPCs (the original's 5 s).
DRAIN_TIMEOUT_S = 5.0
EXIT_USAGE = 2


def parse_duration(text: str) -> float:
    """``durations.parse`` for argparse (``--window 100ms``); negative ones are refused."""
    try:
        seconds = durations.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    return seconds


def parse_lora_names(text: str) -> dict[int, str]:
    """``"1=adapter-a,2=adapter-b"`` -> ``{1: "adapter-a", 2: "adapter-b"}``."""
    names: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        lora_id, sep, name = item.partition("=")
        try:
            key = int(lora_id)
        except ValueError:
            key = -1
        if not sep or key < 0 or not name.strip():
            raise argparse.ArgumentTypeError(f"invalid LoRA adapter mapping {item!r} (want id=name)")
        names[key] = name.strip()
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--engine-endpoint", default="tcp://127.0.0.1:5557", help="the engine's KV-events PUB endpoint")
    add("--replay-endpoint", default=None, help="the engine's replay ROUTER endpoint (default: none)")
    add("--kv-events-bind", action="store_true", help="bind --engine-endpoint (the engine connects)")
    add("--topic", default="", help='ZMQ topic prefix; "" = every topic (vLLM\'s default)')
    add("--server", default="127.0.0.1:9090", help="the server's producer gRPC address host:port")
    add("--token-file", type=Path, default=None, help="bearer token for producer auth, re-read per RPC")
    add("--tls-ca-file", type=Path, default=None, help="PEM CA: use TLS to --server, verified against it")
    add("--tls-server-name", default="", help="the server certificate's name, if not --server's host")
    add("--replica-id", required=True, help="this engine rank's HTTP ip:port (what Envoy routes to)")
    add("--model-id", required=True, help="the model name: with the tenant, scopes this replica's keys")
    add("--tenant-id", default="", help='the tenant of this replica\'s keys; "" = untenanted')
    add("--hash-scheme", default=types.HASH_SCHEME_VLLM, help="must be vllm (our fingerprints)")
    add("--block-size", type=int, default=16, help="the model's KV block size in tokens")
    add("--lora-adapter-names", type=parse_lora_names, default={}, help="id=name,... for LoRA ids")
    add("--window", type=parse_duration, default=producer.DEFAULT_WINDOW_S, help="store debounce (100ms)")
    add("--engine-metrics-url", default="http://127.0.0.1:8000/metrics", help='"" disables stats')
    add("--stats-interval", type=parse_duration, default=10.0, help="stats scrape period (10s)")
    add("--engine-cache-size-bytes", type=int, default=0, help="KV-cache capacity; 0 = unknown")
    add(
        "--max-concurrency-ceiling",
        type=int,
        default=enginestats.DEFAULT_CONCURRENCY_CEILING,
        help="pressure = (running + waiting) / ceiling; <= 0 disables pressure (256)",
    )
    add(
        "--cache-tier",
        type=enginestats.CacheTier,
        choices=list(enginestats.CacheTier),
        default=enginestats.CacheTier.AUTO,
        help="the usage gauge for cache_memory_bytes; auto = kv if present, else max(gpu, cpu)",
    )
    add("--engine-model-name", default="", help="keep only metric series with this model_name label")


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    endpoint: EndpointConfig
    producer: producer.ProducerSettings
    #: ``None``: no stats loop.
    scrape: enginestats.ScrapeSettings | None
    stats_interval_s: float


class UsageError(ValueError):
    """Flags that parse but do not make a valid sidecar (exit 2)."""


def settings_from_args(args: argparse.Namespace) -> SidecarSettings:
    for flag, value in (
        ("--replica-id", args.replica_id),
        ("--model-id", args.model_id),
        ("--hash-scheme", args.hash_scheme),
    ):
        if not value:
            raise UsageError(f"{flag} is required and must not be empty")
    if args.hash_scheme != types.HASH_SCHEME_VLLM:
        raise UsageError(f"--hash-scheme {args.hash_scheme!r}: only {types.HASH_SCHEME_VLLM!r} is produced")
    if not args.window > 0:
        raise UsageError("--window must be positive")
    if not args.stats_interval > 0:
        raise UsageError("--stats-interval must be positive")
    for flag, path in (("--token-file", args.token_file), ("--tls-ca-file", args.tls_ca_file)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    lora_names: Mapping[int, str] = args.lora_adapter_names
    try:
        endpoint = EndpointConfig(
            replica_id=args.replica_id,
            model=args.model_id,
            tenant=args.tenant_id,
            kv_events=args.engine_endpoint,
            kv_events_bind=args.kv_events_bind,
            replay=args.replay_endpoint or None,
            topic=args.topic,
            block_size=args.block_size,
            lora_names=dict(lora_names),
        )
        forwarding = producer.ProducerSettings(
            server=args.server,
            replica_id=args.replica_id,
            model=args.model_id,
            tenant=args.tenant_id,
            hash_scheme=args.hash_scheme,
            window_s=args.window,
            token_file=args.token_file,
            tls_ca_file=args.tls_ca_file,
            tls_server_name=args.tls_server_name,
        )
        scrape = (
            enginestats.ScrapeSettings(
                url=args.engine_metrics_url,
                tier=args.cache_tier,
                model_name=args.engine_model_name,
                cache_size_bytes=args.engine_cache_size_bytes,
                max_concurrency_ceiling=args.max_concurrency_ceiling,
            )
            if args.engine_metrics_url
            else None
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return SidecarSettings(
        endpoint=endpoint, producer=forwarding, scrape=scrape, stats_interval_s=args.stats_interval
    )


async def stats_loop(
    scraper: enginestats.StatsScraper,
    report: Callable[[types.ReplicaStats], None],
    *,
    interval_s: float,
) -> None:
    """Every ``interval_s`` (first tick after one interval): scrape and report; a failed
    scrape skips the tick."""
    async with aiohttp.ClientSession() as session:
        while True:
            await asyncio.sleep(interval_s)
            try:
                result = await scraper.scrape(session)
            except enginestats.ScrapeError as exc:
                logger.warning("engine stats: %s; tick skipped", exc)
                continue
            report(result.stats)


async def serve(settings: SidecarSettings, *, stop: asyncio.Event) -> None:
    """Run the sidecar until ``stop`` is set, then drain (bounded by ``DRAIN_TIMEOUT_S``).

    Raises what the KV-event subscriber raises if it dies on its own.
    """
    async with producer.Producer(settings.producer) as sink:
        subscriber = Subscriber(settings.endpoint, sink)
        tasks = [asyncio.create_task(subscriber.run(), name="subscribe:kv-events")]
        if settings.scrape is not None:
            tasks.append(
                asyncio.create_task(
                    stats_loop(
                        enginestats.StatsScraper(settings.scrape),
                        sink.report_stats,
                        interval_s=settings.stats_interval_s,
                    ),
                    name="subscribe:stats",
                )
            )
        stopping = asyncio.create_task(stop.wait(), name="subscribe:stop")
        try:
            await asyncio.wait([stopping, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            subscriber.stop()
            for task in (stopping, *tasks[1:]):
                task.cancel()
            results = await asyncio.gather(stopping, *tasks, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await sink.aclose()
    for result in results:
        if isinstance(result, Exception):
            raise result


async def _main(settings: SidecarSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "subscribing to %s for replica %s (model %s), forwarding to %s",
        settings.endpoint.kv_events,
        settings.endpoint.replica_id,
        settings.endpoint.model,
        settings.producer.server,
    )
    try:
        await serve(settings, stop=stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    logger.info("stopped")


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except UsageError as exc:
        print(f"inference-cache subscribe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(settings))
    except Exception:
        logger.exception("subscribe: KV-event ingestion failed")
        return 1
    return 0
