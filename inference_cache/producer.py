"""The producer client: a ``BlockSink`` that forwards our block keys to a server over gRPC.

Owner: the ``subscribe`` sidecar (``inference_cache.subscribe``). Place in the flow::

    engine ZMQ --kvevents.Subscriber--> kvevents.Mapper --BlockSink--> Producer
        --ReportCacheState / PublishEvent--> inference-cache serve

Wire mapping (the original Go ``forwarder.go``, with our keys instead of the engine's):

- ``blocks_stored`` appends one legacy ``PrefixEntry{prefix_hash=key, token_count=
  cumulative tokens, adapter_id}`` per block to a pending buffer (one per scope). The buffer
  is flushed ``window`` after its first entry, or at once at ``max_pending`` entries, as one
  ``CacheStateUpdate`` per scope on a fresh ``ReportCacheState`` stream.
- ``blocks_removed`` flushes the pending buffer first (a store must reach the server before
  its eviction), then sends one ``PublishEvent(PREFIX_EVICTED)`` per key.
- ``replica_cleared`` discards the replica's pending stores (the clear supersedes them) and
  sends ``PublishEvent(ALL_CLEARED)``.
- ``report_stats`` sends a stats-only ``CacheStateUpdate``.

Everything is soft state: the sink methods never block (they raise only on misuse); messages go through one
ordered outbox to one sender task; each RPC has its own timeout; an RPC error is logged and
the message dropped (the server's TTL cleans up what a lost removal leaves behind). When a
token file is configured it is re-read on every RPC (so a rotated projected token is picked
up) and sent as ``authorization: Bearer <token>``. The channel is plaintext (the original's
default) unless a CA file is given: then TLS, verified against that CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import grpc

from inference_cache.index import types
from inference_cache.proto import pb, pb_grpc

logger = logging.getLogger(__name__)

#: Seconds: how long stores are debounced into one update (the Go ``--window`` default).
DEFAULT_WINDOW_S = 0.1
#: Pending entries that force an immediate flush (the Go forwarder's batch cap).
DEFAULT_MAX_PENDING = 4096
#: Seconds per RPC, as in the Go forwarder.
DEFAULT_RPC_TIMEOUT_S = 5.0
#: Messages waiting for the sender; beyond it new messages are dropped (soft state) rather
#: than growing memory while the server is unreachable.
DEFAULT_OUTBOX_SIZE = 10_000


class Cancellable(Protocol):
    def cancel(self) -> None: ...


#: ``call_later(delay_s, callback) -> handle``; defaults to the running loop's.
CallLater = Callable[[float, Callable[[], None]], Cancellable]


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    #: The server's producer gRPC address, ``host:port``.
    server: str
    #: Identity of the replica this sidecar reports for (stats-only updates).
    replica_id: str
    model: str
    tenant: str = ""
    hash_scheme: str = types.HASH_SCHEME_VLLM
    window_s: float = DEFAULT_WINDOW_S
    max_pending: int = DEFAULT_MAX_PENDING
    rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S
    outbox_size: int = DEFAULT_OUTBOX_SIZE
    #: File holding a bearer token for servers that authenticate producers; re-read per RPC.
    token_file: Path | None = None
    #: PEM CA bundle: when set the channel uses TLS verified against it (else plaintext).
    tls_ca_file: Path | None = None
    #: Expected server name in its certificate, when it differs from the ``server`` host.
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"rpc_timeout_s must be positive, got {self.rpc_timeout_s}")
        if self.outbox_size < 1:
            raise ValueError(f"outbox_size must be >= 1, got {self.outbox_size}")
        if self.tls_server_name and self.tls_ca_file is None:
            raise ValueError("tls_server_name needs tls_ca_file")


@dataclass(slots=True)
class ProducerCounters:
    """Plain counters (single-threaded asyncio, no locking)."""

    updates_sent: int = 0
    events_sent: int = 0
    rpc_errors: int = 0
    #: Messages dropped because the outbox was full or the producer was closed.
    dropped: int = 0


@dataclass(slots=True)
class _Pending:
    entries: list[pb.PrefixEntry]
    #: Latest event batch time (seconds) of the pending stores; ``None`` = "now".
    ts: float | None


def _micros(ts: float | None) -> int:
    return int(ts * 1e6) if ts is not None and ts > 0 else 0


class Producer:
    """Batches sink calls into InferenceCache producer RPCs. Use as an async context manager.

    ``call_later`` and ``clock`` are injectable for tests; the sink methods must be called
    from the event loop the producer was started in.
    """

    def __init__(
        self,
        settings: ProducerSettings,
        *,
        call_later: CallLater | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.counters = ProducerCounters()
        self._call_later = call_later
        self._clock = clock
        self._pending: dict[tuple[str, types.Scope], _Pending] = {}
        self._pending_count = 0
        self._timer: Cancellable | None = None
        self._outbox: asyncio.Queue[pb.CacheStateUpdate | pb.CacheEvent | None] = asyncio.Queue(
            maxsize=settings.outbox_size
        )
        self._channel: Any = None
        self._stub: Any = None
        self._sender: asyncio.Task[None] | None = None
        #: True between ``start`` and the end-of-stream marker ``aclose`` queues.
        self._accepting = False
        self._closed = False

    # --- lifecycle ---

    async def start(self) -> None:
        if self._sender is not None:
            raise RuntimeError("producer already started")
        loop = asyncio.get_running_loop()
        if self._call_later is None:
            self._call_later = loop.call_later
        self._channel = self._open_channel()
        self._stub = pb_grpc.InferenceCacheStub(self._channel)
        self._sender = asyncio.create_task(self._send_loop(), name="producer-sender")
        self._accepting = True

    def _open_channel(self) -> Any:
        s = self.settings
        if s.tls_ca_file is None:
            return grpc.aio.insecure_channel(s.server)
        credentials = grpc.ssl_channel_credentials(root_certificates=s.tls_ca_file.read_bytes())
        options = [("grpc.ssl_target_name_override", s.tls_server_name)] if s.tls_server_name else []
        return grpc.aio.secure_channel(s.server, credentials, options=options)

    async def aclose(self) -> None:
        """Flush what is pending, send everything queued, then close the channel.

        Bound it from outside (``asyncio.timeout``) for a deadline; cancellation still closes.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._sender is not None:
                self.flush()
                self._accepting = False
                await self._outbox.put(None)
                await asyncio.shield(self._sender)
        finally:
            if self._sender is not None and not self._sender.done():
                self._sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sender
            if self._channel is not None:
                await self._channel.close()

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def idle(self) -> None:
        """Wait until every message queued so far has been sent (or dropped)."""
        await self._outbox.join()

    # --- BlockSink ---

    def blocks_stored(
        self,
        scope: types.Scope,
        replica_id: str,
        keys: Sequence[bytes],
        token_counts: Sequence[int],
        ts: float | None = None,
    ) -> None:
        if len(keys) != len(token_counts):
            raise ValueError(f"{len(keys)} keys but {len(token_counts)} token counts")
        if not keys:
            return
        if not self._accepting:
            self.counters.dropped += 1
            return
        pending = self._pending.setdefault((replica_id, scope), _Pending(entries=[], ts=None))
        pending.entries.extend(
            pb.PrefixEntry(prefix_hash=key, token_count=count, adapter_id=scope.adapter)
            for key, count in zip(keys, token_counts, strict=True)
        )
        if ts is not None:
            pending.ts = ts if pending.ts is None else max(pending.ts, ts)
        self._pending_count += len(keys)
        if self._pending_count >= self.settings.max_pending:
            self.flush()
        elif self._timer is None and self._call_later is not None:
            self._timer = self._call_later(self.settings.window_s, self._on_window)

    def blocks_removed(self, scope: types.Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        self.flush()
        for key in keys:
            self._enqueue(
                pb.CacheEvent(
                    type=pb.CacheEvent.PREFIX_EVICTED,
                    replica_id=replica_id,
                    model_id=scope.model,
                    tenant_id=scope.tenant,
                    prefix_hash=key,
                    adapter_id=scope.adapter,
                    timestamp_us=_micros(self._clock()),
                )
            )

    def replica_cleared(self, replica_id: str, *, model: str, tenant: str) -> None:
        for ident in [
            ident
            for ident in self._pending
            if ident[0] == replica_id and ident[1].model == model and ident[1].tenant == tenant
        ]:
            self._pending_count -= len(self._pending.pop(ident).entries)
        if not self._pending:
            self._cancel_timer()
        self._enqueue(
            pb.CacheEvent(
                type=pb.CacheEvent.ALL_CLEARED,
                replica_id=replica_id,
                model_id=model,
                tenant_id=tenant,
                timestamp_us=_micros(self._clock()),
            )
        )

    # --- stats ---

    def report_stats(self, stats: types.ReplicaStats) -> None:
        """Queue a stats-only ``CacheStateUpdate`` for this sidecar's replica."""
        s = self.settings
        self._enqueue(
            pb.CacheStateUpdate(
                replica_id=s.replica_id,
                model_id=s.model,
                tenant_id=s.tenant,
                hash_scheme=s.hash_scheme,
                timestamp_us=_micros(self._clock()),
                stats=pb.ReplicaStats(
                    replica_id=s.replica_id,
                    cache_memory_bytes=stats.cache_memory_bytes,
                    hit_rate=stats.hit_rate,
                    pressure=stats.pressure,
                ),
            )
        )

    # --- batching ---

    def flush(self) -> None:
        """Queue every pending store now (one update per replica and scope)."""
        self._cancel_timer()
        pending, self._pending, self._pending_count = self._pending, {}, 0
        for (replica_id, scope), batch in pending.items():
            self._enqueue(
                pb.CacheStateUpdate(
                    replica_id=replica_id,
                    model_id=scope.model,
                    tenant_id=scope.tenant,
                    hash_scheme=scope.hash_scheme,
                    adapter_id=scope.adapter,
                    timestamp_us=_micros(batch.ts),
                    prefixes=batch.entries,
                )
            )

    def _on_window(self) -> None:
        self._timer = None
        self.flush()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _enqueue(self, message: pb.CacheStateUpdate | pb.CacheEvent) -> None:
        if not self._accepting:
            self.counters.dropped += 1
            logger.warning("producer not running: dropping a message")
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.counters.dropped += 1
            logger.warning("producer outbox full (%d): dropping a message", self.settings.outbox_size)

    # --- sending ---

    async def _send_loop(self) -> None:
        while True:
            message = await self._outbox.get()
            try:
                if message is None:
                    return
                await self._send(message)
            finally:
                self._outbox.task_done()

    async def _send(self, message: pb.CacheStateUpdate | pb.CacheEvent) -> None:
        try:
            metadata = self._metadata()
            if isinstance(message, pb.CacheStateUpdate):
                await self._stub.ReportCacheState(
                    iter((message,)), timeout=self.settings.rpc_timeout_s, metadata=metadata
                )
                self.counters.updates_sent += 1
            else:
                await self._stub.PublishEvent(message, timeout=self.settings.rpc_timeout_s, metadata=metadata)
                self.counters.events_sent += 1
        except (grpc.RpcError, OSError, ValueError) as exc:
            self.counters.rpc_errors += 1
            logger.warning("producer RPC to %s failed, dropped: %s", self.settings.server, _describe(exc))

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.settings.token_file is None:
            return None
        token = self.settings.token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {self.settings.token_file} is empty")
        return (("authorization", f"Bearer {token}"),)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
