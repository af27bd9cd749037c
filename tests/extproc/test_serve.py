"""``inference-cache serve``: flag validation (exit 2 and its stderr), the ``make run``
configuration end to end in a subprocess (real ports, /readyz, SIGTERM -> exit 0), and
the per-endpoint wiring (readiness probe, stats scrape) against a real aiohttp engine
stand-in on 127.0.0.1.

Nothing is mocked. Flag validation calls the CLI in-process (it exits before logging is
configured); everything that configures process-wide logging runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inference_cache import cli, config
from inference_cache.extproc import endpoints, serve
from inference_cache.index import store

REPO = Path(__file__).resolve().parents[2]
SA = "system:serviceaccount:inference-cache-system:inference-cache-controller-manager"
LOOPBACK_FLAGS = [
    "--grpc-bind-address=127.0.0.1:0",
    "--http-bind-address=127.0.0.1:0",
    "--snapshot-bind-address=127.0.0.1:0",
    "--extproc-bind-address=127.0.0.1:0",
]


@pytest.fixture(autouse=True)
def _no_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in os.environ:
        if key.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            [], "missing --allowed-controller-sa; pass --insecure-disable-auth", id="no-auth-choice"
        ),
        pytest.param(
            ["--allowed-controller-sa", SA, "--insecure-disable-auth"], "mutually exclusive", id="both-auth"
        ),
        pytest.param(
            ["--allowed-controller-sa", f" {SA}"],
            "--allowed-controller-sa has leading/trailing",
            id="sa-space",
        ),
        pytest.param(
            ["--allowed-controller-sa", SA, "--controller-audience", " "],
            "--controller-audience cannot be empty",
            id="blank-audience",
        ),
        pytest.param(
            ["--insecure-disable-auth", "--tls-cert-file", "c.pem"],
            "--tls-cert-file and --tls-key-file must be set together",
            id="partial-tls",
        ),
        pytest.param(
            ["--insecure-disable-auth", "--log-format", "xml"], 'invalid --log-format "xml"', id="format"
        ),
        pytest.param(
            ["--insecure-disable-auth", "--log-level", "loud"], 'invalid --log-level "loud"', id="level"
        ),
        pytest.param(
            ["--insecure-disable-auth", "--grpc-bind-address", "9090"],
            "invalid --grpc-bind-address",
            id="address",
        ),
        pytest.param(
            ["--insecure-disable-auth", "--allowed-producer-sa", "a, b"],
            "--allowed-producer-sa has an empty entry or leading/trailing whitespace (' b')",
            id="producer-sa",
        ),
        pytest.param(
            ["--insecure-disable-auth", "--allowed-producer-sa", "a", "--producer-audience", ""],
            "--producer-audience must be non-empty",
            id="producer-audience",
        ),
    ],
)
def test_invalid_flags_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err


def test_invalid_config_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("models: [{name: m, blocksize: 16}]\n")
    assert cli.main(["serve", "--insecure-disable-auth", "--config", str(path)]) == 2
    assert f"{path}: models[0].blocksize: unknown key" in capsys.readouterr().err


def test_environment_feeds_the_validation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INFERENCE_CACHE_INSECURE_DISABLE_AUTH", "true")
    monkeypatch.setenv("INFERENCE_CACHE_ALLOWED_CONTROLLER_SA", SA)
    assert cli.main(["serve"]) == 2
    assert "mutually exclusive" in capsys.readouterr().err


# -- the real process ---------------------------------------------------------------------------


def _spawn(*argv: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    return subprocess.Popen(
        [sys.executable, "-m", "inference_cache", "serve", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture()
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        assert p.stderr is not None
        p.stderr.close()


def _read_log_until(proc: subprocess.Popen[str], msg: str) -> list[dict[str, Any]]:
    """JSON log lines up to and including the first with ``msg`` (bounded by pytest-timeout)."""
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    for raw in proc.stderr:
        lines.append(json.loads(raw))
        if lines[-1]["msg"] == msg:
            return lines
    raise AssertionError(f"process exited with {proc.wait()} before logging {msg!r}: {lines}")


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def test_make_run_config_serves_and_stops_cleanly_on_sigterm(spawned: list[subprocess.Popen[str]]) -> None:
    proc = _spawn("--config", "examples/serve.yaml", "--insecure-disable-auth", *LOOPBACK_FLAGS)
    spawned.append(proc)
    logs = _read_log_until(proc, "startup")
    assert [(line["level"], line["msg"]) for line in logs] == [
        ("WARN", "controller_auth_disabled"),
        ("INFO", "startup"),
    ]
    startup = logs[-1]
    assert startup["grpc_tls"] is False and startup["endpoints"] == 2
    assert _get(f"http://{startup['http_addr']}/readyz") == (200, "ok\n")
    assert _get(f"http://{startup['http_addr']}/healthz") == (200, "ok\n")
    status, text = _get(f"http://{startup['http_addr']}/metrics")
    assert status == 200 and "inferencecache_server_up 1.0" in text
    status, body = _get(f"http://{startup['snapshot_addr']}/snapshot")
    assert status == 200 and "replicas" in json.loads(body)
    proc.send_signal(signal.SIGTERM)
    tail = _read_log_until(proc, "graceful_shutdown_done")
    assert [line["msg"] for line in tail] == ["graceful_shutdown_started", "graceful_shutdown_done"]
    assert proc.wait(timeout=10) == 0


def test_unloadable_tls_keypair_exits_1(tmp_path: Path, spawned: list[subprocess.Popen[str]]) -> None:
    proc = _spawn(
        "--insecure-disable-auth",
        f"--tls-cert-file={tmp_path / 'missing.crt'}",
        f"--tls-key-file={tmp_path / 'missing.key'}",
        *LOOPBACK_FLAGS,
    )
    spawned.append(proc)
    assert proc.wait(timeout=30) == 1
    assert proc.stderr is not None
    assert "grpc_tls_load_failed" in proc.stderr.read()


# -- per-endpoint wiring ----------------------------------------------------------------------

VLLM_METRICS = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 64
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0
"""


class Engine:
    """An engine stand-in: ``/health`` answers ``health_status``; ``/metrics`` vLLM text."""

    def __init__(self) -> None:
        self.health_status = 200
        self.metrics_status = 200
        self.address = ""

    def app(self) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            return web.Response(status=self.health_status)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(status=self.metrics_status, text=VLLM_METRICS)

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        return app


@pytest.fixture()
async def engine() -> AsyncIterator[Engine]:
    eng = Engine()
    runner = web.AppRunner(eng.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    eng.address = f"127.0.0.1:{runner.addresses[0][1]}"
    yield eng
    await runner.cleanup()


def _worker(
    address: str, index: store.Index, session: aiohttp.ClientSession, **kw: Any
) -> tuple[endpoints.EndpointWorker, list[tuple[str, bool]]]:
    changes: list[tuple[str, bool]] = []
    ep = config.EndpointConfig(address=address, model="m", tenant="t", kv_events="tcp://127.0.0.1:9", **kw)
    worker = endpoints.EndpointWorker(
        ep,
        config.ModelConfig("m"),
        index,
        session,
        health_interval_s=2.0,
        on_ready_change=lambda rid, ok: changes.append((rid, ok)),
    )
    return worker, changes


async def test_readiness_follows_the_health_probe(engine: Engine) -> None:
    async with aiohttp.ClientSession() as session:
        worker, changes = _worker(engine.address, store.Index(), session)
        assert worker.ready  # ready until a probe fails
        assert await worker.probe_once()
        engine.health_status = 503
        assert not await worker.probe_once()
        assert not worker.ready
        engine.health_status = 200
        assert await worker.probe_once()
        assert changes == [(engine.address, False), (engine.address, True)]


async def test_nothing_listening_is_unready() -> None:
    async with aiohttp.ClientSession() as session:
        worker, changes = _worker("127.0.0.1:9", store.Index(), session)
        assert not await worker.probe_once()
        assert changes == [("127.0.0.1:9", False)]


async def test_metrics_scrape_feeds_replica_stats(engine: Engine) -> None:
    index = store.Index()
    async with aiohttp.ClientSession() as session:
        worker, _ = _worker(engine.address, index, session, metrics_url=f"http://{engine.address}/metrics")
        assert await worker.scrape_once()
        (row,) = index.cache_state("t", "m").replicas
        assert row.replica_id == engine.address
        assert row.stats.pressure == pytest.approx(64 / 256)
        engine.metrics_status = 500  # an unreadable metrics_url skips the tick, readiness untouched
        assert not await worker.scrape_once()
        assert await worker.probe_once()
        no_url, _ = _worker(engine.address, index, session)
        assert not await no_url.scrape_once()


async def test_server_marks_an_endpoint_without_engine_unready() -> None:
    ep = config.EndpointConfig(address="127.0.0.1:9", model="m", kv_events="tcp://127.0.0.1:9")
    settings = config.ServerSettings(
        grpc_bind_address="127.0.0.1:0",
        http_bind_address="127.0.0.1:0",
        snapshot_bind_address="127.0.0.1:0",
        extproc_bind_address="127.0.0.1:0",
        insecure_disable_auth=True,
    )
    srv = serve.Server(config.Config(server=settings, models=(config.ModelConfig("m"),), endpoints=(ep,)))
    await srv.start()
    try:

        def ready() -> float | None:
            return srv.metrics.registry.get_sample_value(
                "inferencecache_endpoint_ready", {"replica_id": ep.address}
            )

        assert ready() == 1  # ready until a probe fails
        for _ in range(1000):  # the first probe runs at start; bounded wait for its refusal
            if ready() == 0:
                break
            await asyncio.sleep(0.01)
        assert ready() == 0
        assert srv.index.ready  # an engine that is down never makes the server unready
    finally:
        await srv.stop()


async def test_serve_freezes_long_lived_state_out_of_the_cyclic_gc() -> None:
    settings = config.ServerSettings(
        grpc_bind_address="127.0.0.1:0",
        http_bind_address="127.0.0.1:0",
        snapshot_bind_address="127.0.0.1:0",
        extproc_bind_address="127.0.0.1:0",
        insecure_disable_auth=True,
    )
    cfg = config.Config(server=settings)
    try:
        embedded = serve.Server(cfg)  # in-process embedders keep their GC as it is
        await embedded.start()
        await embedded.stop()
        assert gc.get_freeze_count() == 0
        srv = serve.Server(cfg, freeze_gc=True)  # what `inference-cache serve` runs
        await srv.start()
        await srv.stop()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
