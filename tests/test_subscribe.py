"""``inference-cache subscribe``: flags, and the sidecar end to end.

What is tested: flag parsing and validation exit codes (through ``cli``), Go duration and
LoRA-mapping parsing, and the whole sidecar in-process (``subscribe.serve``): a real ZMQ
publisher sends byte-exact vLLM 0.33 payloads, and a real loopback gRPC server must receive
our fingerprints (never token ids), the eviction and the clear, in order; the stats loop
scrapes a real loopback ``/metrics``. What is faked: the server's behaviour (a recording
servicer). Nothing is slept on: the test awaits what the recorder has received, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import vllm_samples
import zmq
import zmq.asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference_cache import cli, enginestats, subscribe
from inference_cache.index import fingerprint
from inference_cache.proto import pb, pb_grpc

REQUIRED = ["--replica-id", "10.0.0.1:8000", "--model-id", "m"]
BOUND_S = 10.0  # an upper bound for loopback I/O, not a timing goal


def parse(*argv: str) -> argparse.Namespace:
    full = ["subscribe", *argv]
    return cli.build_parser(full).parse_args(full)


# --- flags ---


def test_defaults_match_the_original_except_the_topic() -> None:
    s = subscribe.settings_from_args(parse(*REQUIRED))
    assert (s.endpoint.kv_events, s.endpoint.topic, s.endpoint.replay, s.endpoint.block_size) == (
        "tcp://127.0.0.1:5557",
        "",
        None,
        16,
    )
    assert (s.producer.server, s.producer.hash_scheme, s.producer.window_s, s.producer.tenant) == (
        "127.0.0.1:9090",
        "vllm",
        0.1,
        "",
    )
    assert s.scrape == enginestats.ScrapeSettings(url="http://127.0.0.1:8000/metrics")
    assert s.stats_interval_s == 10.0


def test_every_flag_reaches_the_settings(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("token")
    (tmp_path / "ca.pem").write_text("not parsed before start")
    s = subscribe.settings_from_args(
        parse(
            *REQUIRED,
            "--engine-endpoint=ipc:///x",
            "--replay-endpoint=tcp://127.0.0.1:5558",
            "--kv-events-bind",
            "--topic=kv-events",
            "--server=srv:9091",
            f"--token-file={tmp_path / 't'}",
            f"--tls-ca-file={tmp_path / 'ca.pem'}",
            "--tls-server-name=inference-cache-server.svc",
            "--tenant-id=acme",
            "--block-size=32",
            "--lora-adapter-names=1=a, 2=b",
            "--window=250ms",
            "--engine-metrics-url=http://e/metrics",
            "--stats-interval=1m30s",
            "--engine-cache-size-bytes=1024",
            "--max-concurrency-ceiling=8",
            "--cache-tier=gpu",
            "--engine-model-name=llama",
        )
    )
    e, p = s.endpoint, s.producer
    assert (e.kv_events, e.replay, e.kv_events_bind, e.topic, e.tenant, e.block_size) == (
        "ipc:///x",
        "tcp://127.0.0.1:5558",
        True,
        "kv-events",
        "acme",
        32,
    )
    assert dict(e.lora_names) == {1: "a", 2: "b"}
    assert (p.server, p.token_file, p.tenant, p.window_s) == ("srv:9091", tmp_path / "t", "acme", 0.25)
    assert (p.tls_ca_file, p.tls_server_name) == (tmp_path / "ca.pem", "inference-cache-server.svc")
    assert s.scrape == enginestats.ScrapeSettings(
        url="http://e/metrics",
        tier=enginestats.CacheTier.GPU,
        model_name="llama",
        cache_size_bytes=1024,
        max_concurrency_ceiling=8,
    )
    assert s.stats_interval_s == 90.0


def test_empty_metrics_url_disables_stats() -> None:
    assert subscribe.settings_from_args(parse(*REQUIRED, "--engine-metrics-url=")).scrape is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--replica-id=", "--model-id=m"], "--replica-id", id="empty-replica"),
        pytest.param(["--replica-id=r", "--model-id="], "--model-id", id="empty-model"),
        pytest.param([*REQUIRED, "--hash-scheme="], "--hash-scheme", id="empty-scheme"),
        pytest.param([*REQUIRED, "--hash-scheme=sglang"], "only 'vllm'", id="other-scheme"),
        pytest.param([*REQUIRED, "--window=0s"], "--window", id="zero-window"),
        pytest.param([*REQUIRED, "--stats-interval=0"], "--stats-interval", id="zero-interval"),
        pytest.param([*REQUIRED, "--block-size=0"], "block_size", id="zero-block-size"),
        pytest.param([*REQUIRED, "--engine-cache-size-bytes=-1"], "cache_size_bytes", id="negative-size"),
        pytest.param([*REQUIRED, "--token-file=/nonexistent/t"], "--token-file", id="missing-token-file"),
        pytest.param([*REQUIRED, "--tls-ca-file=/nonexistent/ca"], "--tls-ca-file", id="missing-ca-file"),
        pytest.param([*REQUIRED, "--tls-server-name=x"], "tls_ca_file", id="server-name-without-ca"),
    ],
)
def test_invalid_values_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["subscribe", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--model-id=m"], id="missing-replica"),
        pytest.param(["--replica-id=r"], id="missing-model"),
        pytest.param([*REQUIRED, "--cache-tier=hbm"], id="bad-tier"),
        pytest.param([*REQUIRED, "--window=100"], id="unitless-window"),
        pytest.param([*REQUIRED, "--lora-adapter-names=a=1"], id="bad-lora"),
    ],
)
def test_unparseable_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["subscribe", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("10s", 10.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("500us", 5e-4),
        ("0", 0.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert subscribe.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "1m x", "-1s", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        subscribe.parse_duration(text)


# --- end to end ---


class Recorder(pb_grpc.InferenceCacheServicer):
    """Records producer RPCs (message, raw bytes) and wakes waiters on each one."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.raw: list[bytes] = []
        self._changed = asyncio.Condition()

    async def _record(self, message: Any) -> Any:
        async with self._changed:
            self.received.append(message)
            self.raw.append(message.SerializeToString())
            self._changed.notify_all()
        return pb.Ack(accepted=True)

    async def ReportCacheState(self, request_iterator: Any, context: Any) -> Any:
        ack = None
        async for update in request_iterator:
            ack = await self._record(update)
        return ack

    async def PublishEvent(self, request: Any, context: Any) -> Any:
        return await self._record(request)

    async def wait_for(self, count: int) -> list[Any]:
        async with asyncio.timeout(BOUND_S), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return self.received[:count]


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
def publisher_ctx() -> Iterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.term()


@asynccontextmanager
async def sidecar(*argv: str) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(subscribe.serve(subscribe.settings_from_args(parse(*argv)), stop=stop))
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(BOUND_S):
            await task


async def test_vllm_events_reach_the_server_as_our_fingerprints(
    server: tuple[str, Recorder], publisher_ctx: zmq.asyncio.Context, tmp_path: Path
) -> None:
    address, rec = server
    pub = publisher_ctx.socket(zmq.XPUB)  # XPUB: we see the sidecar's subscription arrive
    try:
        endpoint = f"ipc://{tmp_path / 'kv.sock'}"
        pub.bind(endpoint)
        async with sidecar(
            *REQUIRED,
            "--tenant-id=acme",
            f"--engine-endpoint={endpoint}",
            f"--server={address}",
            "--engine-metrics-url=",
            "--window=1h",  # never fires here: the removal must flush the stores before itself
        ):
            async with asyncio.timeout(BOUND_S):
                assert await pub.recv() == b"\x01"  # subscribed to "" (every topic)
            # The engine stores 1..32, re-stores block 1 under its parent (group 0), evicts
            # block 1 (group 0), then clears.
            titles = ["BlockStored x2 blocks", "BlockStored with parent", "BlockRemoved", "AllBlocksCleared"]
            for seq, title in enumerate(titles):
                frame = vllm_samples.captured(title)
                topic, payload = frame.topic, frame.payload
                await pub.send_multipart([topic, struct.pack(">Q", seq), payload])
            stored, evicted, cleared = await rec.wait_for(3)
    finally:
        pub.close(linger=0)

    k0, k1 = fingerprint.chain_keys(list(range(1, 33)), 16)
    assert stored == pb.CacheStateUpdate(
        replica_id="10.0.0.1:8000",
        model_id="m",
        tenant_id="acme",
        hash_scheme="vllm",
        timestamp_us=1700000001_000000,  # the latest batch of the window
        prefixes=[
            pb.PrefixEntry(prefix_hash=k0, token_count=16),
            pb.PrefixEntry(prefix_hash=k1, token_count=32),
            pb.PrefixEntry(prefix_hash=k1, token_count=32),  # the re-store, chained from k0
        ],
    )
    assert (evicted.type, evicted.prefix_hash, evicted.replica_id, evicted.model_id, evicted.tenant_id) == (
        pb.CacheEvent.PREFIX_EVICTED,
        k1,
        "10.0.0.1:8000",
        "m",
        "acme",
    )
    assert (cleared.type, cleared.replica_id, cleared.model_id) == (
        pb.CacheEvent.ALL_CLEARED,
        "10.0.0.1:8000",
        "m",
    )
    # Token ids never leave the pod (neither as u32 little-endian nor as a varint run).
    for raw in rec.raw:
        assert struct.pack("<4I", 1, 2, 3, 4) not in raw
        assert bytes(range(1, 17)) not in raw


async def test_stats_loop_reports_engine_metrics(server: tuple[str, Recorder], tmp_path: Path) -> None:
    address, rec = server

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text='vllm:num_requests_running{model_name="m"} 2\n'
            'vllm:num_requests_waiting{model_name="m"} 2\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.5\n'
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    engine = TestServer(app, host="127.0.0.1")
    await engine.start_server()
    try:
        async with sidecar(
            *REQUIRED,
            f"--engine-endpoint=ipc://{tmp_path / 'silent.sock'}",
            f"--server={address}",
            f"--engine-metrics-url={engine.make_url('/metrics')}",
            "--stats-interval=10ms",
            "--engine-cache-size-bytes=1000",
            "--max-concurrency-ceiling=16",
        ):
            (update,) = await rec.wait_for(1)
    finally:
        await engine.close()
    assert update.replica_id == "10.0.0.1:8000" and not update.prefixes
    assert update.stats == pb.ReplicaStats(
        replica_id="10.0.0.1:8000", cache_memory_bytes=500, hit_rate=0.0, pressure=0.25
    )


async def test_sigterm_stops_the_sidecar_gracefully(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inference_cache",
        "subscribe",
        *REQUIRED,
        f"--engine-endpoint=ipc://{tmp_path / 'kv.sock'}",
        "--server=127.0.0.1:1",
        "--engine-metrics-url=",
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,  # not the checkout: its top-level folders would shadow the install
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(BOUND_S):
            while b"subscribing to" not in (line := await proc.stderr.readline()):
                assert line, "the sidecar exited before it started"
            # Logged once the SIGTERM handler is installed.
            proc.send_signal(signal.SIGTERM)
            _, rest = await proc.communicate()
        assert proc.returncode == 0
        assert b"stopped" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
