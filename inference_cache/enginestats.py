"""Engine ``/metrics`` scraping: vLLM Prometheus text -> :class:`~inference_cache.index.types.ReplicaStats`.

Owner: the ``subscribe`` sidecar (its stats loop) and the server (the ``metrics_url`` of
configured endpoints). Place in the flow::

    engine GET /metrics --fetch_metrics_text--> text --parse_metrics--> EngineSample
        --StatsScraper.observe (keeps the previous counters)--> EngineStats
        --> CacheStateUpdate.stats (sidecar) / the router's load model (server)

Projection rules (byte-for-byte those of the original Go ``metrics_scraper.go``):

- usage by cache tier: ``kv`` = ``vllm:kv_cache_usage_perc`` (vLLM >= 0.21), ``gpu`` =
  ``vllm:gpu_cache_usage_perc``, ``cpu`` = ``vllm:cpu_cache_usage_perc``, ``auto`` = kv if
  present else max(gpu, cpu) of those present; ``cache_memory_bytes = int(usage * size)``
  (0 when the size is unknown).
- hit rate = delta ``vllm:prefix_cache_hits(_total)`` / delta
  ``vllm:prefix_cache_queries(_total)`` against the previous scrape: first scrape -> 0;
  counter reset or no new queries -> 0 and the baseline is rebased; either counter missing
  -> 0 and the baseline is kept (so a reappearing counter does not fake a spike); clamped
  to [0, 1]. Counters are summed across the matching series; ``name_total`` is preferred
  to the bare ``name`` (Python clients append ``_total``, others do not).
- pressure = clamp01((running + waiting) / ceiling); a ceiling <= 0 disables it (0).
- ``model_name``: when set, only series carrying that exact ``model_name`` label count
  (series without the label are excluded: better under-report one tick than attribute
  another model's load to this replica).

Deliberate deviation: where the Go code took the *first* series of a gauge, we sum the
request gauges (running/waiting: load adds up across series) and take the max of the usage
gauges (the fullest pool is the binding one), so the answer does not depend on series order.

Scraping is fail-soft: every I/O, status, encoding and parse failure is translated once,
here, into :class:`ScrapeError`; callers log it and skip the tick.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from inference_cache.index import types

KV_USAGE = "vllm:kv_cache_usage_perc"
GPU_USAGE = "vllm:gpu_cache_usage_perc"
CPU_USAGE = "vllm:cpu_cache_usage_perc"
PREFIX_HITS = "vllm:prefix_cache_hits"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
REQUESTS_RUNNING = "vllm:num_requests_running"
REQUESTS_WAITING = "vllm:num_requests_waiting"

MODEL_LABEL = "model_name"

#: Seconds; bounds one whole scrape (connect + read), as the Go scraper did.
DEFAULT_TIMEOUT_S = 5.0
#: The pressure denominator's default: a typical vLLM ``max_num_seqs``.
DEFAULT_CONCURRENCY_CEILING = 256


class CacheTier(enum.StrEnum):
    """Which vLLM usage gauge feeds ``cache_memory_bytes``."""

    AUTO = "auto"
    KV = "kv"
    GPU = "gpu"
    CPU = "cpu"


class ScrapeError(Exception):
    """One scrape failed (network, status, encoding or exposition syntax); skip the tick."""


@dataclass(frozen=True, slots=True)
class EngineSample:
    """The vLLM series of one scrape, aggregated over the matching series.

    ``None`` means "no matching series in this scrape", which is distinct from a real 0.
    """

    kv_cache_usage_perc: float | None = None
    gpu_cache_usage_perc: float | None = None
    cpu_cache_usage_perc: float | None = None
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    num_requests_running: float | None = None
    num_requests_waiting: float | None = None


@dataclass(frozen=True, slots=True)
class HitRateBaseline:
    """The counters of the previous scrape that the next hit-rate delta is taken against."""

    hits: float
    queries: float


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    """How one engine is scraped and projected."""

    #: The engine's Prometheus endpoint, e.g. ``http://127.0.0.1:8000/metrics``.
    url: str
    tier: CacheTier = CacheTier.AUTO
    #: Keep only series with this ``model_name`` label; ``""`` keeps every series.
    model_name: str = ""
    #: The engine's KV-cache capacity in bytes; 0 = unknown (``cache_memory_bytes`` stays 0).
    cache_size_bytes: int = 0
    #: Pressure denominator (requests); <= 0 disables pressure.
    max_concurrency_ceiling: int = DEFAULT_CONCURRENCY_CEILING
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.cache_size_bytes < 0:
            raise ValueError(f"cache_size_bytes must be >= 0, got {self.cache_size_bytes}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One scrape's projection: the stats we report plus the raw load gauges."""

    stats: types.ReplicaStats
    num_requests_running: float | None
    num_requests_waiting: float | None
    kv_cache_usage_perc: float | None


def clamp01(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, value))


def _matching(
    samples: Iterable[tuple[str, dict[str, str], float]], name: str, model_name: str
) -> list[float]:
    return [
        value
        for sample_name, labels, value in samples
        if sample_name == name and (not model_name or labels.get(MODEL_LABEL) == model_name)
    ]


def parse_metrics(text: str, *, model_name: str = "") -> EngineSample:
    """Aggregate the vLLM series of a Prometheus or OpenMetrics exposition.

    Raises :class:`ScrapeError` when the text is not a valid exposition.
    """
    try:
        samples = [
            (s.name, s.labels, float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except (ValueError, TypeError, IndexError) as exc:
        raise ScrapeError(f"unparseable metrics exposition: {exc}") from exc

    def gauge(name: str, combine: Callable[[Iterable[float]], float]) -> float | None:
        values = _matching(samples, name, model_name)
        return combine(values) if values else None

    def counter(name: str) -> float | None:
        values = _matching(samples, name + "_total", model_name) or _matching(samples, name, model_name)
        return sum(values) if values else None

    return EngineSample(
        kv_cache_usage_perc=gauge(KV_USAGE, max),
        gpu_cache_usage_perc=gauge(GPU_USAGE, max),
        cpu_cache_usage_perc=gauge(CPU_USAGE, max),
        prefix_cache_hits=counter(PREFIX_HITS),
        prefix_cache_queries=counter(PREFIX_QUERIES),
        num_requests_running=gauge(REQUESTS_RUNNING, sum),
        num_requests_waiting=gauge(REQUESTS_WAITING, sum),
    )


def select_usage(sample: EngineSample, tier: CacheTier) -> float | None:
    """The cache usage (0..1) for ``tier``; ``None`` when its gauge is absent."""
    if tier is CacheTier.KV:
        return sample.kv_cache_usage_perc
    if tier is CacheTier.GPU:
        return sample.gpu_cache_usage_perc
    if tier is CacheTier.CPU:
        return sample.cpu_cache_usage_perc
    if sample.kv_cache_usage_perc is not None:
        return sample.kv_cache_usage_perc
    legacy = [v for v in (sample.gpu_cache_usage_perc, sample.cpu_cache_usage_perc) if v is not None]
    return max(legacy) if legacy else None


def pressure(running: float | None, waiting: float | None, ceiling: int) -> float:
    load = (running or 0.0) + (waiting or 0.0)
    if ceiling <= 0 or load <= 0:
        return 0.0
    return clamp01(load / ceiling)


def hit_rate(
    previous: HitRateBaseline | None, hits: float | None, queries: float | None
) -> tuple[float, HitRateBaseline | None]:
    """The hit rate since ``previous`` and the baseline for the next scrape."""
    if hits is None or queries is None:
        return 0.0, previous
    current = HitRateBaseline(hits=hits, queries=queries)
    if previous is None:
        return 0.0, current
    d_hits = hits - previous.hits
    d_queries = queries - previous.queries
    if d_hits < 0 or d_queries <= 0:
        return 0.0, current
    return clamp01(d_hits / d_queries), current


def project(
    sample: EngineSample, settings: ScrapeSettings, previous: HitRateBaseline | None
) -> tuple[EngineStats, HitRateBaseline | None]:
    """Pure projection of one scrape given the previous hit-rate baseline."""
    usage = select_usage(sample, settings.tier)
    memory = int(clamp01(usage) * settings.cache_size_bytes) if usage is not None else 0
    rate, baseline = hit_rate(previous, sample.prefix_cache_hits, sample.prefix_cache_queries)
    stats = types.ReplicaStats(
        cache_memory_bytes=memory,
        hit_rate=rate,
        pressure=pressure(
            sample.num_requests_running, sample.num_requests_waiting, settings.max_concurrency_ceiling
        ),
    )
    return (
        EngineStats(
            stats=stats,
            num_requests_running=sample.num_requests_running,
            num_requests_waiting=sample.num_requests_waiting,
            kv_cache_usage_perc=sample.kv_cache_usage_perc,
        ),
        baseline,
    )


async def fetch_metrics_text(session: aiohttp.ClientSession, url: str, *, timeout_s: float) -> str:
    """GET ``url`` and return its body as text; any failure is a :class:`ScrapeError`."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise ScrapeError(f"scrape {url}: HTTP status {resp.status}")
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ScrapeError(f"scrape {url}: {exc!r}") from exc
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScrapeError(f"scrape {url}: body is not UTF-8") from exc


class StatsScraper:
    """Scrapes one engine repeatedly, keeping the hit-rate baseline between scrapes.

    Not safe for concurrent ``scrape`` calls on one instance (one loop per engine).
    """

    def __init__(self, settings: ScrapeSettings) -> None:
        self.settings = settings
        self._baseline: HitRateBaseline | None = None

    def observe(self, text: str) -> EngineStats:
        """Project one exposition text and advance the baseline."""
        sample = parse_metrics(text, model_name=self.settings.model_name)
        result, self._baseline = project(sample, self.settings, self._baseline)
        return result

    async def scrape(self, session: aiohttp.ClientSession) -> EngineStats:
        """Fetch and project; raises :class:`ScrapeError` (baseline untouched) on failure."""
        text = await fetch_metrics_text(session, self.settings.url, timeout_s=self.settings.timeout_s)
        return self.observe(text)
