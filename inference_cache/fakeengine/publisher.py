"""The ZMQ side of KV events: a PUB stream and a ROUTER replay socket, as vLLM runs them.

Owner: ``inference_cache.fakeengine``; the engine hands it encoded batches (``events``),
subscribers (our ``subscribe`` sidecar, peers' routers) read it. Mirrors
``vllm.distributed.kv_events.ZmqEventPublisher`` (shared/research/protocols.md §1.1-1.3):

* frames ``[topic, seq (8-byte big-endian, from 0), payload]``;
* the PUB socket binds when the endpoint holds ``*`` or ``::`` or is ``ipc://``/``inproc://``,
  and connects otherwise; the replay ROUTER always binds;
* data-parallel rank ``r`` offsets a tcp port by ``r`` and suffixes inproc names ``_dp<r>``;
* the last ``buffer_steps`` batches are kept for replay; a request ``[id, b"", start_seq]``
  is answered with every kept batch from ``start_seq`` and an end marker (seq ``-1``):
  ``[seq, payload]`` / ``[b"\\xff"*8, b""]`` up to 0.25, ``[topic, seq, payload]`` /
  ``[b"", b"\\xff"*8, b""]`` from 0.26.

Fault switches for tests: :meth:`ZmqPublisher.drop_next` (a sequence gap on the PUB stream,
batches still replayable) and :meth:`ZmqPublisher.restart` (sequence 0, empty buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

import zmq
import zmq.asyncio

from inference_cache.fakeengine.versions import Version

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Replies carry the topic from this version on.
THREE_FRAME_REPLAY_SINCE: Version = (0, 26, 0)


def binds(endpoint: str) -> bool:
    """vLLM's rule for the PUB socket (``tcp://0.0.0.0:5557`` therefore *connects*)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of data-parallel rank ``rank`` (``offset_endpoint_port``)."""
    if rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    if "tcp" in endpoint:
        base, _, port = endpoint.rpartition(":")
        if port.isdigit() and int(port) != 0:
            return f"{base}:{int(port) + rank}"
    return endpoint


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class PublisherSettings:
    endpoint: str
    """PUB endpoint before the rank offset, e.g. ``tcp://*:5557``."""
    replay_endpoint: str | None = None
    topic: str = ""
    buffer_steps: int = 10000
    hwm: int = 100000
    data_parallel_rank: int = 0
    version: Version = (0, 33, 0)


class ZmqPublisher:
    """Owns the sockets; :meth:`publish` is synchronous and never blocks (drops at HWM)."""

    def __init__(
        self, settings: PublisherSettings, *, context: zmq.Context[zmq.Socket[bytes]] | None = None
    ) -> None:
        self.settings = settings
        self._own_context = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context if context is not None else zmq.Context()
        self._actx = zmq.asyncio.Context.shadow(self._ctx.underlying)
        self._topic = settings.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=settings.buffer_steps)
        self._next_seq = 0
        self._drop = 0
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.endpoint = offset_endpoint(settings.endpoint, settings.data_parallel_rank)
        self.replay_endpoint = (
            offset_endpoint(settings.replay_endpoint, settings.data_parallel_rank)
            if settings.replay_endpoint
            else None
        )

    async def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self.settings.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        if binds(self.endpoint):
            pub.bind(self.endpoint)
            self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            pub.connect(self.endpoint)
        self._pub = pub
        if self.replay_endpoint:
            router = self._actx.socket(zmq.ROUTER)
            router.setsockopt(zmq.SNDHWM, 2 * (self.settings.buffer_steps + 1))
            router.setsockopt(zmq.LINGER, 0)
            router.bind(self.replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._router = router
            self._replay_task = asyncio.create_task(self._serve_replay(router), name="kv-events-replay")

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        if self._own_context:
            self._ctx.term()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def publish(self, payload: bytes) -> int:
        """Number, buffer and send one batch; returns its sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        if self._drop:
            self._drop -= 1
            return seq
        if self._pub is None:
            raise RuntimeError("publisher not started")
        try:
            self._pub.send_multipart([self._topic, seq_bytes(seq), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("kv events: PUB high-water mark reached, batch %d dropped", seq)
        return seq

    def drop_next(self, n: int) -> None:
        """The next ``n`` batches get sequence numbers and are buffered but not sent."""
        self._drop += n

    def restart(self) -> None:
        """What a restarted engine process looks like on the wire: sequence 0, no history."""
        self._next_seq = 0
        self._drop = 0
        self._buffer.clear()

    def replay_frames(self, start_seq: int) -> list[list[bytes]]:
        """The replies (without the ``[identity, b""]`` envelope) to a replay request."""
        three = self.settings.version >= THREE_FRAME_REPLAY_SINCE
        out = [
            [self._topic, seq_bytes(seq), payload] if three else [seq_bytes(seq), payload]
            for seq, payload in self._buffer
            if seq >= start_seq
        ]
        out.append([b"", END_SEQ, b""] if three else [END_SEQ, b""])
        return out

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                log.warning("kv events replay: malformed request (%d frames)", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big", signed=True)
            for reply in self.replay_frames(start_seq):
                await router.send_multipart([identity, b"", *reply])
