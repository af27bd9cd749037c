"""``extproc.tls``: gRPC server TLS from files, with rotation picked up at handshake.

Certificates are self-signed, generated per test with the ``openssl`` command line into
``tmp_path``. A real ``grpc.aio`` server with the standard health service listens on
127.0.0.1; real TLS and plaintext clients call ``Health/Check`` on fresh channels (a
fresh channel means a fresh handshake). Rotation is simulated by rewriting the files
and advancing the certificate's mtime explicitly (no sleeping).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inference_cache.extproc import tls

RPC_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Keypair:
    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()


def _self_signed(directory: Path, name: str) -> Keypair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Keypair(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(pair.key), "-out", str(pair.cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return pair


def _install(source: Keypair, target: Keypair, *, mtime_step_s: int) -> None:
    """Rotate ``target`` to ``source``'s content, its cert mtime strictly later than before."""
    before = target.cert.stat().st_mtime_ns if target.cert.exists() else 0
    target.key.write_bytes(source.key.read_bytes())
    target.cert.write_bytes(source.cert.read_bytes())
    later = before + mtime_step_s * 1_000_000_000
    os.utime(target.cert, ns=(later, later))


@pytest.fixture()
def tls_pairs(tmp_path: Path) -> tuple[Keypair, Keypair, Keypair]:
    """(first, second, served): two distinct self-signed pairs and the files the server reads."""
    first, second = _self_signed(tmp_path / "gen", "first"), _self_signed(tmp_path / "gen", "second")
    served = Keypair(tmp_path / "tls" / "tls.crt", tmp_path / "tls" / "tls.key")
    served.cert.parent.mkdir()
    _install(first, served, mtime_step_s=0)
    return first, second, served


@pytest.fixture()
async def tls_grpc_port(tls_pairs: tuple[Keypair, Keypair, Keypair]) -> AsyncIterator[int]:
    served = tls_pairs[2]
    creds = tls.load_grpc_server_credentials(str(served.cert), str(served.key))
    assert creds is not None
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


async def _check(channel: grpc.aio.Channel) -> int:
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
        )
        return int(reply.status)


def _trusting(port: int, pair: Keypair) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(pair.cert_pem))


SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_tls_client_succeeds_and_plaintext_client_fails(
    tls_grpc_port: int, tls_pairs: tuple[Keypair, Keypair, Keypair]
) -> None:
    first, second, _ = tls_pairs
    assert await _check(_trusting(tls_grpc_port, first)) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await _check(grpc.aio.insecure_channel(f"127.0.0.1:{tls_grpc_port}"))
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as untrusted:
        await _check(_trusting(tls_grpc_port, second))
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_rotation_is_picked_up_without_restart(
    tls_grpc_port: int, tls_pairs: tuple[Keypair, Keypair, Keypair]
) -> None:
    first, second, served = tls_pairs
    assert await _check(_trusting(tls_grpc_port, first)) == SERVING
    _install(second, served, mtime_step_s=10)
    assert await _check(_trusting(tls_grpc_port, second)) == SERVING
    with pytest.raises(grpc.aio.AioRpcError):
        await _check(_trusting(tls_grpc_port, first))


async def test_broken_rotation_keeps_the_last_good_pair(
    tls_grpc_port: int, tls_pairs: tuple[Keypair, Keypair, Keypair], caplog: pytest.LogCaptureFixture
) -> None:
    first, second, served = tls_pairs
    # A torn rotation: the new certificate with the old key.
    served.cert.write_bytes(second.cert_pem)
    later = served.cert.stat().st_mtime_ns + 10_000_000_000
    os.utime(served.cert, ns=(later, later))
    with caplog.at_level(logging.ERROR, logger=tls.__name__):
        assert await _check(_trusting(tls_grpc_port, first)) == SERVING
    assert "grpc_tls_reload" in [r.getMessage() for r in caplog.records]
    # Completing the rotation is picked up by the next handshake.
    served.key.write_bytes(second.key.read_bytes())
    os.utime(served.cert, ns=(later + 1, later + 1))
    assert await _check(_trusting(tls_grpc_port, second)) == SERVING


def test_posture_from_flags(tmp_path: Path) -> None:
    pair = _self_signed(tmp_path, "p")
    assert tls.load_grpc_server_credentials("", "") is None
    with pytest.raises(tls.PartialTLSConfigError):
        tls.load_grpc_server_credentials(str(pair.cert), "")
    with pytest.raises(tls.PartialTLSConfigError):
        tls.load_grpc_server_credentials("", str(pair.key))
    assert isinstance(tls.load_grpc_server_credentials(str(pair.cert), str(pair.key)), grpc.ServerCredentials)


def test_unloadable_keypair_fails_at_startup(tmp_path: Path) -> None:
    a, b = _self_signed(tmp_path, "a"), _self_signed(tmp_path, "b")
    with pytest.raises(tls.TLSLoadError):
        tls.load_grpc_server_credentials(str(a.cert), str(b.key))  # mismatched pair
    with pytest.raises(tls.TLSLoadError):
        tls.load_grpc_server_credentials(str(tmp_path / "missing.crt"), str(a.key))
    (tmp_path / "garbage.crt").write_text("not a certificate")
    with pytest.raises(tls.TLSLoadError):
        tls.load_grpc_server_credentials(str(tmp_path / "garbage.crt"), str(a.key))


def test_fetcher_reports_no_change_until_the_mtime_advances(tmp_path: Path) -> None:
    a, b = _self_signed(tmp_path, "a"), _self_signed(tmp_path, "b")
    served = Keypair(tmp_path / "tls.crt", tmp_path / "tls.key")
    _install(a, served, mtime_step_s=0)
    keypair = tls.ReloadingKeypair(served.cert, served.key)
    assert keypair() is None
    _install(b, served, mtime_step_s=0)  # same mtime: not a rotation
    assert keypair() is None
    _install(b, served, mtime_step_s=1)
    assert isinstance(keypair(), grpc.ServerCertificateConfiguration)
    assert keypair() is None
