"""``inference_cache.enginestats``: vLLM exposition text -> ReplicaStats.

What is tested: the pure parse/projection rules of the original scraper (both counter name
forms, OpenMetrics, cache tiers, counter reset, partial counters, model filter, clamps) and
the aiohttp fetch (status, encoding, network errors) against a real loopback HTTP server.
Nothing is mocked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference_cache import enginestats as es
from inference_cache.index import types

Sample = es.EngineSample

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} {queries}
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} {hits}
"""


def vllm_text(hits: float, queries: float) -> str:
    return VLLM_TEXT.replace("{hits}", str(hits)).replace("{queries}", str(queries))


def counters(hits: float | None, queries: float | None, *, suffix: str = "_total") -> str:
    lines = []
    if hits is not None:
        lines.append(f'vllm:prefix_cache_hits{suffix}{{model_name="m"}} {hits}')
    if queries is not None:
        lines.append(f'vllm:prefix_cache_queries{suffix}{{model_name="m"}} {queries}')
    return "\n".join(lines) + "\n"


def scraper(**kwargs: object) -> es.StatsScraper:
    return es.StatsScraper(es.ScrapeSettings(url="http://unused/metrics", **kwargs))  # type: ignore[arg-type]


def test_real_vllm_exposition_projects_usage_load_and_raw_gauges() -> None:
    s = scraper(cache_size_bytes=1000, max_concurrency_ceiling=16)
    got = s.observe(vllm_text(10, 100))
    assert got.stats == types.ReplicaStats(cache_memory_bytes=250, hit_rate=0.0, pressure=0.5)
    assert (got.num_requests_running, got.num_requests_waiting, got.kv_cache_usage_perc) == (3, 5, 0.25)


@pytest.mark.parametrize("suffix", [pytest.param("_total", id="total"), pytest.param("", id="bare")])
def test_hit_rate_is_the_delta_ratio_in_both_name_forms(suffix: str) -> None:
    s = scraper()
    assert s.observe(counters(10, 100, suffix=suffix)).stats.hit_rate == 0.0  # first scrape
    assert s.observe(counters(40, 200, suffix=suffix)).stats.hit_rate == pytest.approx(0.3)


def test_untyped_bare_counters_parse_too() -> None:
    assert es.parse_metrics("vllm:prefix_cache_hits 7\n") == Sample(prefix_cache_hits=7.0)


def test_total_form_wins_over_bare_form() -> None:
    text = "vllm:prefix_cache_hits 1000\nvllm:prefix_cache_hits_total 7\n"
    assert es.parse_metrics(text).prefix_cache_hits == 7.0


def test_openmetrics_exposition() -> None:
    text = """\
# TYPE vllm:prefix_cache_hits counter
# HELP vllm:prefix_cache_hits hits
vllm:prefix_cache_hits_total{model_name="m"} 10.0
vllm:prefix_cache_hits_created{model_name="m"} 1.7e9
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="m"} 20.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
# EOF
"""
    assert es.parse_metrics(text) == Sample(
        kv_cache_usage_perc=0.5, prefix_cache_hits=10.0, prefix_cache_queries=20.0
    )


def test_counters_are_summed_across_series() -> None:
    text = 'vllm:prefix_cache_hits_total{engine="0"} 3\nvllm:prefix_cache_hits_total{engine="1"} 4\n'
    assert es.parse_metrics(text).prefix_cache_hits == 7.0


def test_counter_reset_yields_zero_then_rebases() -> None:
    s = scraper()
    s.observe(counters(50, 100))
    assert s.observe(counters(5, 10)).stats.hit_rate == 0.0  # engine restarted
    assert s.observe(counters(15, 30)).stats.hit_rate == pytest.approx(0.5)  # delta from 5/10


def test_no_new_queries_yields_zero() -> None:
    s = scraper()
    s.observe(counters(50, 100))
    assert s.observe(counters(50, 100)).stats.hit_rate == 0.0


def test_missing_counter_keeps_the_baseline() -> None:
    s = scraper()
    s.observe(counters(10, 100))
    assert s.observe(counters(None, 150)).stats.hit_rate == 0.0
    assert s.observe(counters(None, None)).stats.hit_rate == 0.0
    # Against the kept 10/100, not against a fake 0/0 baseline (which would give 0.1).
    assert s.observe(counters(70, 200)).stats.hit_rate == pytest.approx(0.6)


def test_hit_rate_is_clamped() -> None:
    rate, _ = es.hit_rate(es.HitRateBaseline(hits=0, queries=0), hits=50, queries=10)
    assert rate == 1.0


def test_model_filter_excludes_other_models_and_unlabelled_series() -> None:
    text = """\
vllm:num_requests_running{model_name="m"} 2
vllm:num_requests_running{model_name="other"} 100
vllm:num_requests_running 100
vllm:kv_cache_usage_perc{model_name="other"} 0.9
"""
    assert es.parse_metrics(text, model_name="m") == Sample(num_requests_running=2.0)
    assert es.parse_metrics(text).num_requests_running == 202.0
    assert es.parse_metrics(text, model_name="absent") == Sample()


@pytest.mark.parametrize(
    ("tier", "sample", "want"),
    [
        pytest.param(
            es.CacheTier.AUTO,
            Sample(kv_cache_usage_perc=0.1, gpu_cache_usage_perc=0.9),
            0.1,
            id="auto-kv-first",
        ),
        pytest.param(
            es.CacheTier.AUTO,
            Sample(gpu_cache_usage_perc=0.2, cpu_cache_usage_perc=0.7),
            0.7,
            id="auto-max-legacy",
        ),
        pytest.param(es.CacheTier.AUTO, Sample(gpu_cache_usage_perc=0.2), 0.2, id="auto-gpu-only"),
        pytest.param(es.CacheTier.AUTO, Sample(), None, id="auto-none"),
        pytest.param(es.CacheTier.KV, Sample(gpu_cache_usage_perc=0.2), None, id="kv-pinned"),
        pytest.param(
            es.CacheTier.GPU, Sample(kv_cache_usage_perc=0.1, gpu_cache_usage_perc=0.2), 0.2, id="gpu"
        ),
        pytest.param(es.CacheTier.CPU, Sample(cpu_cache_usage_perc=0.3), 0.3, id="cpu"),
    ],
)
def test_usage_by_tier(tier: es.CacheTier, sample: es.EngineSample, want: float | None) -> None:
    assert es.select_usage(sample, tier) == want


def test_memory_bytes_zero_when_size_unknown() -> None:
    assert scraper().observe("vllm:kv_cache_usage_perc 0.5\n").stats.cache_memory_bytes == 0


@pytest.mark.parametrize(
    ("running", "waiting", "ceiling", "want"),
    [
        pytest.param(3, 1, 8, 0.5, id="ratio"),
        pytest.param(300, 10, 256, 1.0, id="clamped"),
        pytest.param(3, 1, 0, 0.0, id="disabled"),
        pytest.param(None, None, 256, 0.0, id="absent"),
        pytest.param(None, 64, 256, 0.25, id="waiting-only"),
    ],
)
def test_pressure(running: float | None, waiting: float | None, ceiling: int, want: float) -> None:
    assert es.pressure(running, waiting, ceiling) == want


def test_garbage_is_a_scrape_error_and_keeps_the_baseline() -> None:
    s = scraper()
    s.observe(counters(10, 100))
    with pytest.raises(es.ScrapeError):
        s.observe("vllm:prefix_cache_hits_total{ 1\n")
    assert s.observe(counters(20, 200)).stats.hit_rate == pytest.approx(0.1)


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="cache_size_bytes"):
        es.ScrapeSettings(url="x", cache_size_bytes=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        es.ScrapeSettings(url="x", timeout_s=0)


# --- fetch over real HTTP (loopback) ---


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, dict[str, object]]]:
    """A loopback ``/metrics`` whose response the test sets via the returned dict."""
    reply: dict[str, object] = {"status": 200, "body": vllm_text(1, 2).encode()}

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(status=int(reply["status"]), body=reply["body"])  # type: ignore[call-overload]

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/metrics")), reply
    finally:
        await server.close()


async def test_scrape_over_http(engine: tuple[str, dict[str, object]]) -> None:
    url, reply = engine
    s = es.StatsScraper(es.ScrapeSettings(url=url))
    async with aiohttp.ClientSession() as session:
        assert (await s.scrape(session)).num_requests_running == 3.0
        reply["body"] = vllm_text(2, 4).encode()
        assert (await s.scrape(session)).stats.hit_rate == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        pytest.param(503, b"", "status 503", id="non-200"),
        pytest.param(200, b"\xff\xfe metrics", "not UTF-8", id="not-utf8"),
        pytest.param(200, b"vllm:x{ 1\n", "unparseable", id="garbage"),
    ],
)
async def test_scrape_failures_are_scrape_errors(
    engine: tuple[str, dict[str, object]], status: int, body: bytes, match: str
) -> None:
    url, reply = engine
    reply.update(status=status, body=body)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(es.ScrapeError, match=match):
            await es.StatsScraper(es.ScrapeSettings(url=url)).scrape(session)


async def test_unreachable_engine_is_a_scrape_error() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(es.ScrapeError, match=r"127\.0\.0\.1:1"):
            await es.fetch_metrics_text(session, "http://127.0.0.1:1/metrics", timeout_s=5)
