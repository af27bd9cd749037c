"""``inference_cache.producer``: the gRPC ``BlockSink`` of the ``subscribe`` sidecar.

What is tested: debouncing (window, size cap), store-before-evict order, a clear superseding
pending stores, the shutdown flush, stats-only updates, bearer-token metadata, and that RPC
failures are counted and dropped. What is faked: the flush timer (a manual ``call_later``)
and the server's behaviour (a recording servicer). Not mocked: gRPC itself: a real
``grpc.aio`` server on 127.0.0.1 and the real generated stubs.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from inference_cache import producer as prod
from inference_cache.index import types
from inference_cache.proto import pb, pb_grpc

SCOPE = types.Scope(tenant="t", model="m", hash_scheme="vllm", adapter="lora-a")
K1, K2, K3 = b"\x00" * 7 + b"\x01", b"\x00" * 7 + b"\x02", b"\x00" * 7 + b"\x03"


class Recorder(pb_grpc.InferenceCacheServicer):
    """Records producer RPCs (message, metadata) in arrival order; can fail the next N."""

    def __init__(self) -> None:
        self.received: list[tuple[Any, dict[str, str]]] = []
        self.fail_next = 0

    async def _record(self, message: Any, context: Any) -> Any:
        if self.fail_next:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
        self.received.append((message, dict(context.invocation_metadata())))
        return pb.Ack(accepted=True)

    async def ReportCacheState(self, request_iterator: Any, context: Any) -> Any:
        updates = [u async for u in request_iterator]
        assert len(updates) == 1, "one update per stream"
        return await self._record(updates[0], context)

    async def PublishEvent(self, request: Any, context: Any) -> Any:
        return await self._record(request, context)

    @property
    def messages(self) -> list[Any]:
        return [m for m, _ in self.received]


@dataclass
class ManualTimer:
    """An injected ``call_later``: callbacks run only when the test calls ``fire``."""

    calls: list[tuple[float, Callable[[], None], ManualTimer.Handle]] = field(default_factory=list)

    @dataclass
    class Handle:
        cancelled: bool = False

        def cancel(self) -> None:
            self.cancelled = True

    def __call__(self, delay: float, callback: Callable[[], None]) -> ManualTimer.Handle:
        handle = ManualTimer.Handle()
        self.calls.append((delay, callback, handle))
        return handle

    def fire(self) -> None:
        due, self.calls = self.calls, []
        for _, callback, handle in due:
            if not handle.cancelled:
                callback()

    @property
    def armed(self) -> list[float]:
        return [delay for delay, _, handle in self.calls if not handle.cancelled]


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    srv = grpc.aio.server()
    pb_grpc.add_InferenceCacheServicer_to_server(recorder, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        await srv.stop(None)


@pytest.fixture
def server_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and ``inference-cache-server`` (``openssl``)."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "1", "-subj", "/CN=inference-cache-server", "-addext",
         "subjectAltName=DNS:inference-cache-server,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_server(server_cert: tuple[Path, Path]) -> AsyncIterator[tuple[str, Recorder, Path]]:
    """A recording server serving ``server_cert``."""
    cert, key = server_cert
    recorder = Recorder()
    srv = grpc.aio.server()
    pb_grpc.add_InferenceCacheServicer_to_server(recorder, srv)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    await srv.start()
    try:
        yield f"127.0.0.1:{port}", recorder, cert
    finally:
        await srv.stop(None)


def settings(address: str, **kwargs: Any) -> prod.ProducerSettings:
    return prod.ProducerSettings(server=address, replica_id="10.0.0.1:8000", model="m", tenant="t", **kwargs)


def entries(update: Any) -> list[tuple[bytes, int, str]]:
    return [(e.prefix_hash, e.token_count, e.adapter_id) for e in update.prefixes]


async def test_stores_are_debounced_into_one_update(server: tuple[str, Recorder]) -> None:
    address, rec = server
    timer = ManualTimer()
    async with prod.Producer(settings(address, window_s=0.25), call_later=timer) as p:
        p.blocks_stored(SCOPE, "10.0.0.1:8000", [K1, K2], [16, 32], ts=1700000000.5)
        p.blocks_stored(SCOPE, "10.0.0.1:8000", [K3], [48], ts=1700000001.0)
        await p.idle()
        assert rec.received == []
        assert timer.armed == [0.25]  # one window, armed by the first store
        timer.fire()
        await p.idle()
    assert len(rec.messages) == 1
    update = rec.messages[0]
    assert isinstance(update, pb.CacheStateUpdate)
    assert (update.replica_id, update.model_id, update.tenant_id, update.hash_scheme, update.adapter_id) == (
        "10.0.0.1:8000",
        "m",
        "t",
        "vllm",
        "lora-a",
    )
    assert update.timestamp_us == 1700000001_000000
    assert entries(update) == [(K1, 16, "lora-a"), (K2, 32, "lora-a"), (K3, 48, "lora-a")]
    assert not update.HasField("stats")


async def test_size_cap_flushes_without_waiting_for_the_window(server: tuple[str, Recorder]) -> None:
    address, rec = server
    timer = ManualTimer()
    async with prod.Producer(settings(address, max_pending=3), call_later=timer) as p:
        p.blocks_stored(SCOPE, "r", [K1], [16])
        p.blocks_stored(SCOPE, "r", [K2, K3], [32, 48])
        await p.idle()
        assert [entries(u) for u in rec.messages] == [
            [(K1, 16, "lora-a"), (K2, 32, "lora-a"), (K3, 48, "lora-a")]
        ]
        assert timer.armed == []  # the window timer was cancelled by the flush
        assert rec.messages[0].timestamp_us == 0  # no batch time: the server's "now"


async def test_removal_flushes_pending_stores_first(server: tuple[str, Recorder]) -> None:
    address, rec = server
    async with prod.Producer(settings(address), call_later=ManualTimer()) as p:
        p.blocks_stored(SCOPE, "r", [K1, K2], [16, 32])
        p.blocks_removed(SCOPE, "r", [K1, K2])
        await p.idle()
    first, *evictions = rec.messages
    assert entries(first) == [(K1, 16, "lora-a"), (K2, 32, "lora-a")]
    assert [
        (e.type, e.prefix_hash, e.replica_id, e.model_id, e.tenant_id, e.adapter_id) for e in evictions
    ] == [
        (pb.CacheEvent.PREFIX_EVICTED, K1, "r", "m", "t", "lora-a"),
        (pb.CacheEvent.PREFIX_EVICTED, K2, "r", "m", "t", "lora-a"),
    ]


async def test_clear_supersedes_pending_stores(server: tuple[str, Recorder]) -> None:
    address, rec = server
    timer = ManualTimer()
    other = types.Scope(tenant="t", model="other", hash_scheme="vllm")
    async with prod.Producer(settings(address), call_later=timer) as p:
        p.blocks_stored(SCOPE, "r", [K1], [16])
        p.blocks_stored(other, "r", [K2], [16])
        p.replica_cleared("r", model="m", tenant="t")
        timer.fire()
        await p.idle()
    cleared, update = rec.messages
    assert (cleared.type, cleared.replica_id, cleared.model_id, cleared.tenant_id) == (
        pb.CacheEvent.ALL_CLEARED,
        "r",
        "m",
        "t",
    )
    assert (update.model_id, entries(update)) == ("other", [(K2, 16, "")])  # the other model survives


async def test_shutdown_flushes_pending_stores(server: tuple[str, Recorder]) -> None:
    address, rec = server
    timer = ManualTimer()
    async with prod.Producer(settings(address), call_later=timer) as p:
        p.blocks_stored(SCOPE, "r", [K1], [16])
    assert [entries(u) for u in rec.messages] == [[(K1, 16, "lora-a")]]
    p.blocks_stored(SCOPE, "r", [K2], [16])  # after close: dropped, not queued forever
    assert p.counters.dropped == 1


async def test_stats_only_update(server: tuple[str, Recorder]) -> None:
    address, rec = server
    async with prod.Producer(settings(address), clock=lambda: 1700000002.25) as p:
        p.report_stats(types.ReplicaStats(cache_memory_bytes=123, hit_rate=0.5, pressure=0.25))
        await p.idle()
    (update,) = rec.messages
    assert update == pb.CacheStateUpdate(
        replica_id="10.0.0.1:8000",
        model_id="m",
        tenant_id="t",
        hash_scheme="vllm",
        timestamp_us=1700000002_250000,
        stats=pb.ReplicaStats(
            replica_id="10.0.0.1:8000", cache_memory_bytes=123, hit_rate=0.5, pressure=0.25
        ),
    )


async def test_server_errors_are_dropped_and_the_stream_goes_on(server: tuple[str, Recorder]) -> None:
    address, rec = server
    rec.fail_next = 2
    async with prod.Producer(settings(address), call_later=ManualTimer()) as p:
        p.blocks_stored(SCOPE, "r", [K1], [16])
        p.blocks_removed(SCOPE, "r", [K3])  # flushes the store; both RPCs fail
        p.blocks_removed(SCOPE, "r", [K2])
        await p.idle()
    assert [m.prefix_hash for m in rec.messages] == [K2]
    assert (p.counters.rpc_errors, p.counters.updates_sent, p.counters.events_sent) == (2, 0, 1)


async def test_unreachable_server_does_not_block_shutdown() -> None:
    async with prod.Producer(settings("127.0.0.1:1", rpc_timeout_s=5.0), call_later=ManualTimer()) as p:
        p.blocks_stored(SCOPE, "r", [K1], [16])
        p.blocks_removed(SCOPE, "r", [K1])
    assert p.counters.rpc_errors == 2


async def test_bearer_token_is_reread_on_every_rpc(server: tuple[str, Recorder], tmp_path: Path) -> None:
    address, rec = server
    token = tmp_path / "token"
    token.write_text("first\n")
    async with prod.Producer(settings(address, token_file=token), call_later=ManualTimer()) as p:
        p.blocks_removed(SCOPE, "r", [K1])
        await p.idle()
        token.write_text("second")
        p.report_stats(types.ReplicaStats())
        await p.idle()
        token.write_text("")
        p.blocks_removed(SCOPE, "r", [K2])  # empty token: not sent unauthenticated
        await p.idle()
    assert [md["authorization"] for _, md in rec.received] == ["Bearer first", "Bearer second"]
    assert p.counters.rpc_errors == 1


async def test_no_token_file_sends_no_authorization(server: tuple[str, Recorder]) -> None:
    address, rec = server
    async with prod.Producer(settings(address), call_later=ManualTimer()) as p:
        p.blocks_removed(SCOPE, "r", [K1])
        await p.idle()
    assert "authorization" not in rec.received[0][1]


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="window_s"):
        prod.ProducerSettings(server="x", replica_id="r", model="m", window_s=0)
    with pytest.raises(ValueError, match="max_pending"):
        prod.ProducerSettings(server="x", replica_id="r", model="m", max_pending=0)


async def test_mismatched_counts_are_a_programming_error(server: tuple[str, Recorder]) -> None:
    address, _ = server
    async with prod.Producer(settings(address), call_later=ManualTimer()) as p:
        with pytest.raises(ValueError, match="token counts"):
            p.blocks_stored(SCOPE, "r", [K1, K2], [16])


@pytest.mark.parametrize(
    "server_name", [pytest.param("", id="by-ip"), pytest.param("inference-cache-server", id="by-name")]
)
async def test_tls_channel_verified_against_the_ca(
    tls_server: tuple[str, Recorder, Path], server_name: str
) -> None:
    address, rec, ca = tls_server
    async with prod.Producer(settings(address, tls_ca_file=ca, tls_server_name=server_name)) as p:
        p.blocks_removed(SCOPE, "r", [K1])
        await p.idle()
    assert [m.prefix_hash for m in rec.messages] == [K1]


async def test_plaintext_producer_cannot_talk_to_a_tls_server(tls_server: tuple[str, Recorder, Path]) -> None:
    address, rec, _ = tls_server
    async with prod.Producer(settings(address)) as p:
        p.blocks_removed(SCOPE, "r", [K1])
        await p.idle()
    assert (rec.messages, p.counters.rpc_errors) == ([], 1)
