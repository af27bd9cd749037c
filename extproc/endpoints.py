"""Per configured engine endpoint: readiness probe, KV-event subscriber, stats scrape.

Owner: ``inference_cache.extproc`` (the server's composition root starts one
:class:`EndpointWorker` per ``endpoints[]`` entry). Place in the flow::

    engine GET /health    --probe every health_interval_s--> EndpointWorker.ready
    engine ZMQ KV events  --kvevents.Subscriber/Mapper-->    Index.blocks_stored/removed/cleared
                                                             (+ the model's ByteIndex, if any)
    engine GET metrics_url --enginestats.StatsScraper-->     Index.set_stats (+ on_stats: the
                                                             picker's engine load gauges)

Readiness: a new endpoint counts as ready until a probe fails; it is ready again after the
next ``200``. Nothing here makes the server unready: an engine that is down only loses its
own readiness. A missing or unreadable ``metrics_url`` never touches readiness (the scrape
is skipped for that tick). Sleeping is injected so tests drive the loops themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from inference_cache import config as config_mod
from inference_cache import enginestats
from inference_cache.index.bytekeys import ByteIndex
from inference_cache.index.kvevents import config as kv_config
from inference_cache.index.kvevents.counters import Counters
from inference_cache.index.kvevents.subscriber import Subscriber, SubscriberSettings
from inference_cache.index.store import Index

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

#: Seconds between scrapes of an endpoint's ``metrics_url`` (the original's stats period).
DEFAULT_STATS_INTERVAL_S = 10.0
#: Bound on one readiness probe.
PROBE_TIMEOUT_S = 1.0


def kv_endpoint(
    endpoint: config_mod.EndpointConfig, model: config_mod.ModelConfig
) -> kv_config.EndpointConfig:
    """Our config entry (with ``kv_events``) -> the KV-event subscriber's endpoint."""
    assert endpoint.kv_events is not None
    return kv_config.EndpointConfig(
        replica_id=endpoint.address,
        model=endpoint.model,
        kv_events=endpoint.kv_events,
        tenant=endpoint.tenant,
        block_size=model.block_size,
        kv_events_bind=endpoint.kv_events_bind,
        replay=endpoint.replay,
        topic=endpoint.topic,
        lora_names={a.id: a.name for a in model.lora_adapters},
        engine="sglang" if endpoint.engine == "sglang" else "vllm",
        data_parallel_size=endpoint.data_parallel_size,
    )


class EndpointWorker:
    """Runs the three loops of one endpoint until cancelled (see the module docstring)."""

    def __init__(
        self,
        endpoint: config_mod.EndpointConfig,
        model: config_mod.ModelConfig,
        index: Index,
        session: aiohttp.ClientSession,
        *,
        health_interval_s: float,
        stats_interval_s: float = DEFAULT_STATS_INTERVAL_S,
        subscriber_settings: SubscriberSettings | None = None,
        on_ready_change: Callable[[str, bool], None] | None = None,
        on_stats: Callable[[str, enginestats.EngineStats | None], None] | None = None,
        sleep: Sleep = asyncio.sleep,
        byte_index: ByteIndex | None = None,
    ) -> None:
        """``byte_index``: the model's byte-chain index (``matching: bytes``), fed by the
        subscriber beside ``index``."""
        self.endpoint = endpoint
        self.replica_id = endpoint.address
        self._index = index
        self._session = session
        self._health_interval_s = health_interval_s
        self._stats_interval_s = stats_interval_s
        self._on_ready_change = on_ready_change
        self._on_stats = on_stats
        self._sleep = sleep
        self.ready = True
        #: ``None`` for an endpoint without ``kv_events`` (its model is matched approximately).
        self.subscriber = (
            Subscriber(
                kv_endpoint(endpoint, model),
                index,
                settings=subscriber_settings,
                sleep=sleep,
                bytes_sink=byte_index,
            )
            if endpoint.kv_events
            else None
        )
        self._no_events = Counters()
        self._scraper = (
            enginestats.StatsScraper(
                enginestats.ScrapeSettings(url=endpoint.metrics_url, model_name=model.name)
            )
            if endpoint.metrics_url
            else None
        )

    @property
    def counters(self) -> Counters:
        return self.subscriber.counters if self.subscriber is not None else self._no_events

    @property
    def health_url(self) -> str:
        return f"http://{self.endpoint.address}/health"

    async def probe_once(self) -> bool:
        """One ``GET /health``: ready iff it answers 200."""
        try:
            async with self._session.get(
                self.health_url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            ) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok != self.ready:
            self.ready = ok
            if self._on_ready_change is not None:
                self._on_ready_change(self.replica_id, ok)
        return ok

    async def scrape_once(self) -> bool:
        """One stats scrape into the index; ``False`` (logged) when it failed or is off."""
        if self._scraper is None:
            return False
        try:
            result = await self._scraper.scrape(self._session)
        except enginestats.ScrapeError as exc:
            log.debug("endpoint_scrape_failed", extra={"replica_id": self.replica_id, "error": str(exc)})
            if self._on_stats is not None:
                self._on_stats(self.replica_id, None)  # stale load gauges must not steer routing
            return False
        self._index.set_stats(
            tenant=self.endpoint.tenant,
            model=self.endpoint.model,
            replica_id=self.replica_id,
            stats=result.stats,
        )
        if self._on_stats is not None:
            self._on_stats(self.replica_id, result)
        return True

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[bool]]) -> None:
        while True:
            await step()
            await self._sleep(interval_s)

    async def run(self) -> None:
        """Probe, subscribe and scrape until cancelled; the subscriber closes its sockets."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._every(self._health_interval_s, self.probe_once))
            if self.subscriber is not None:
                tg.create_task(self.subscriber.run())
            if self._scraper is not None:
                tg.create_task(self._every(self._stats_interval_s, self.scrape_once))
