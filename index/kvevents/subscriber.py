"""Asyncio ZMQ client of one engine endpoint: sequence tracking, replay, resync.

Owner: ``inference_cache.index.kvevents``. Run by the server (one per engine endpoint)
and by the ``subscribe`` sidecar; feeds decoded batches to a ``Mapper`` and from there
to a ``BlockSink``. Wire (research ``protocols.md`` §1.2-1.3):

- SUB socket per data-parallel rank, connected where the engine binds (or bound where
  the engine connects, ``kv_events_bind``); frames ``[topic, seq (8B BE), payload]``;
- per rank: connecting with no state, the first message, and the first after a restart
  ask replay from 0, i.e. the oldest buffered batch (with no state yet, a buffer that
  no longer starts at 0 is applied as far as it goes: unknown parents become orphans);
  a gap asks replay of the missing range; a sequence going backwards is an engine
  restart (state dropped, rebuilt from replay); replay that cannot
  cover a gap (none configured, failed, or starting after the gap) drops the rank's
  state and continues (new stores rebuild it). Batches already applied are skipped;
- replay: a fresh DEALER per request, ``[b"", start_seq (8B BE)]``; replies are
  2- (vLLM <= 0.25) or 3-frame (>= 0.26) shaped, ended by sequence -1;
- malformed input is counted and logged once per kind, never fatal; socket errors
  reopen the sockets after an exponential backoff (``sleep`` is injected).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from inference_cache.index.kvevents import decode
from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.index.kvevents.counters import Counters
from inference_cache.index.kvevents.mapper import BlockSink, Mapper

if TYPE_CHECKING:  # the ``subscribe`` sidecar never loads ``tokenizers``
    from inference_cache.index.bytekeys import ByteIndex

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SubscriberSettings:
    #: Seconds to wait for a whole replay answer before giving up (then: resync).
    replay_timeout_s: float = 5.0
    #: Reconnect backoff: first delay, doubling up to the maximum (seconds).
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: SUB receive high-water mark (messages): live batches queue here while a replay
    #: runs; vLLM's publisher default ``hwm`` is 100000 too.
    rcvhwm: int = 100_000


@dataclass(slots=True)
class _Channel:
    """One rank's sockets' addresses and sequence state."""

    rank: int
    endpoint: str
    replay: str | None
    #: Sequence of the last batch applied, live or replayed (``None``: not synced yet).
    last_seq: int | None = None
    #: Sequence of the last live message (replay may run ahead of the live stream).
    last_live: int | None = None


class Subscriber:
    """Ingests one engine endpoint (all its data-parallel ranks) into ``sink``."""

    def __init__(
        self,
        config: EndpointConfig,
        sink: BlockSink,
        *,
        settings: SubscriberSettings | None = None,
        context: zmq.asyncio.Context | None = None,
        counters: Counters | None = None,
        sleep: Sleep = asyncio.sleep,
        bytes_sink: ByteIndex | None = None,
    ) -> None:
        """``bytes_sink``: the model's byte-chain index (``Mapper``), when matched by bytes."""
        self.config = config
        self.counters = counters if counters is not None else Counters()
        self.mapper = Mapper(config, sink, self.counters, bytes_sink=bytes_sink)
        self._settings = settings or SubscriberSettings()
        self._context = context
        self._sleep = sleep
        self._stopped = asyncio.Event()
        self._logged: set[str] = set()

    def stop(self) -> None:
        """Ask ``run()`` to return (from the loop running it)."""
        self._stopped.set()

    async def run(self) -> None:
        """Ingest until ``stop()``; sockets are closed (linger 0) and tasks awaited on exit."""
        own_context = self._context is None
        ctx = zmq.asyncio.Context() if own_context else self._context
        assert ctx is not None
        channels = [_Channel(r, ep, replay) for r, ep, replay in self.config.rank_endpoints()]
        tasks = [
            asyncio.create_task(self._channel(ctx, ch), name=f"kvevents:{ch.endpoint}") for ch in channels
        ]
        stopper = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stopper, *tasks):
                t.cancel()
            results = await asyncio.gather(stopper, *tasks, return_exceptions=True)
            if own_context:
                ctx.destroy(linger=0)
        for r in results:
            if isinstance(r, Exception):
                raise r

    # -- one rank ----------------------------------------------------------------------------

    async def _channel(self, ctx: zmq.asyncio.Context, ch: _Channel) -> None:
        backoff = self._settings.backoff_initial_s
        while True:
            sub = ctx.socket(zmq.SUB)
            try:
                sub.setsockopt(zmq.RCVHWM, self._settings.rcvhwm)
                # ZMQ reconnects a connected SUB by itself; cap its backoff like ours.
                sub.setsockopt(zmq.RECONNECT_IVL_MAX, int(self._settings.backoff_max_s * 1000))
                sub.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode("utf-8"))
                if self.config.kv_events_bind:
                    sub.bind(ch.endpoint)
                else:
                    sub.connect(ch.endpoint)
                backoff = self._settings.backoff_initial_s
                if ch.last_seq is None and ch.replay is not None:
                    # (Re)connected with no state: ask for the oldest buffered batch now
                    # rather than at the first live batch (an idle engine sends none).
                    await self._sync(ctx, ch, 0, initial=True)
                while True:
                    frames = await sub.recv_multipart()
                    await self._on_live(ctx, ch, frames)
            except zmq.ZMQError as exc:
                self.counters.reconnects += 1
                log.warning(
                    "kv events %s (rank %d): %s; retrying in %.1fs", ch.endpoint, ch.rank, exc, backoff
                )
            finally:
                sub.close(linger=0)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._settings.backoff_max_s)

    async def _on_live(self, ctx: zmq.asyncio.Context, ch: _Channel, frames: list[bytes]) -> None:
        try:
            msg = decode.split_live(frames)
        except decode.EventDecodeError as exc:
            self._decode_error(exc)
            return
        if ch.last_live is not None and msg.seq <= ch.last_live:
            # One publisher's stream only ever increases (PUB drops, never reorders).
            self.counters.restarts += 1
            log.info(
                "kv events %s (rank %d): sequence %d after %d, engine restarted",
                ch.endpoint,
                ch.rank,
                msg.seq,
                ch.last_live,
            )
            self.mapper.drop_rank(ch.rank)
            ch.last_seq = None
        ch.last_live = msg.seq
        if ch.last_seq is None:
            await self._sync(ctx, ch, 0, initial=True)
        elif msg.seq > ch.last_seq + 1:
            self.counters.gaps += 1
            await self._sync(ctx, ch, ch.last_seq + 1, initial=False)
        self._apply(ch, msg)

    async def _sync(self, ctx: zmq.asyncio.Context, ch: _Channel, start: int, *, initial: bool) -> None:
        """Replay from ``start``; resync (drop the rank's state) when the gap stays open."""
        covered = False
        if ch.replay is not None:
            covered = await self._replay(ctx, ch, start)
        if not covered and not initial:
            self.counters.resyncs += 1
            log.info("kv events %s (rank %d): events from %d lost, resyncing", ch.endpoint, ch.rank, start)
            self.mapper.drop_rank(ch.rank)

    async def _replay(self, ctx: zmq.asyncio.Context, ch: _Channel, start: int) -> bool:
        """Apply replayed batches from ``start``; True when the replay began at ``start``."""
        assert ch.replay is not None
        self.counters.replays_requested += 1
        dealer = ctx.socket(zmq.DEALER)
        covered = False
        first = True
        try:
            dealer.connect(ch.replay)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(self._settings.replay_timeout_s):
                while (msg := decode.split_replay(await dealer.recv_multipart())) is not None:
                    self.counters.replayed_batches += 1
                    if first:
                        covered, first = msg.seq <= start, False
                        if not covered and ch.last_seq is not None:
                            return False  # a gap replay cannot cover: the caller resyncs
                    self._apply(ch, msg)
        except TimeoutError:
            log.warning("kv events %s (rank %d): replay from %d timed out", ch.endpoint, ch.rank, start)
            return False
        except decode.EventDecodeError as exc:
            self._decode_error(exc)
            return False
        finally:
            dealer.close(linger=0)
        if first and ch.last_seq is None:
            # An empty buffer: nothing was published yet, so the next batch is seq ``start``.
            ch.last_seq = start - 1
            return True
        return covered

    def _apply(self, ch: _Channel, msg: decode.Message) -> None:
        if ch.last_seq is not None and msg.seq <= ch.last_seq:
            self.counters.duplicates += 1
            return
        ch.last_seq = msg.seq
        try:
            batch = decode.decode_batch(msg.payload, engine=self.config.engine)
        except decode.EventDecodeError as exc:
            self._decode_error(exc)
            return
        self.counters.batches += 1
        self.mapper.apply(batch, rank=ch.rank)

    def _decode_error(self, exc: decode.EventDecodeError) -> None:
        self.counters.decode_errors[exc.kind] += 1
        if exc.kind not in self._logged:
            self._logged.add(exc.kind)
            log.warning("kv events from %s: skipping undecodable input (%s)", self.config.replica_id, exc)
