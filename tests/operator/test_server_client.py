"""operator/server_client.py against a recording aiohttp server on 127.0.0.1: the requests
(method, path, body, the bearer token re-read from its file on every call) and the one
translation of failures into ServerUnavailable / ServerRejected. The real server's side of
the same calls is exercised in test_handlers_controlplane.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference_cache.extproc import templates
from inference_cache.operator import server_client
from inference_cache.operator.server_client import (
    ServerClient,
    ServerClientSettings,
    ServerRejected,
    ServerUnavailable,
)


@dataclass
class Recorder:
    requests: list[tuple[str, str, str | None, bytes]] = field(default_factory=list)
    status: int = 200
    body: bytes = b'{"replicas": null}'
    hang: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        self.requests.append((request.method, request.path, request.headers.get("Authorization"), data))
        if self.hang is not None:
            await self.hang.wait()
        return web.Response(status=self.status, body=self.body)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield rec, str(server.make_url("")).rstrip("/")
    finally:
        if rec.hang is not None:
            rec.hang.set()
        await server.close()


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return path


async def test_calls_carry_the_token_read_on_each_call(
    recorder: tuple[Recorder, str], tmp_path: Path
) -> None:
    rec, url = recorder
    path = token_file(tmp_path, "first")
    async with ServerClient(ServerClientSettings(url=url, token_file=path)) as client:
        assert await client.snapshot() == {"replicas": None}
        path.write_text("rotated")  # the kubelet rewrites the projected token in place
        rec.status, rec.body = 204, b""
        await client.push_policy({"version": 7, "policies": []})
        stored = templates.build(
            "team-a", "t", {"body": "Hi {{.x}}", "slots": [{"name": "x", "type": "Mutable"}]}
        )
        await client.put_templates([stored])
    assert [(m, p, a) for m, p, a, _ in rec.requests] == [
        ("GET", "/snapshot", "Bearer first"),
        ("POST", "/policy", "Bearer rotated"),
        ("PUT", "/templates", "Bearer rotated"),
    ]
    assert json.loads(rec.requests[1][3]) == {"version": 7, "policies": []}
    assert templates.decode(rec.requests[2][3]) == (stored,)


async def test_no_token_file_sends_no_authorization(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    async with ServerClient(ServerClientSettings(url=url, token_file=None)) as client:
        await client.snapshot()
    assert rec.requests[0][2] is None


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
async def test_an_unreadable_token_is_unavailable_and_nothing_is_sent(
    recorder: tuple[Recorder, str], tmp_path: Path, content: str | None
) -> None:
    rec, url = recorder
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    async with ServerClient(ServerClientSettings(url=url, token_file=path)) as client:
        with pytest.raises(ServerUnavailable, match="controller token"):
            await client.snapshot()
    assert rec.requests == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ServerRejected),
        (401, ServerRejected),
        (403, ServerRejected),
        (500, ServerUnavailable),
        (503, ServerUnavailable),
    ],
)
async def test_http_errors_are_translated(
    recorder: tuple[Recorder, str], status: int, error: type[Exception]
) -> None:
    rec, url = recorder
    rec.status, rec.body = status, b"decode policy: bad\n"
    async with ServerClient(ServerClientSettings(url=url, token_file=None)) as client:
        with pytest.raises(error) as err:
            await client.push_policy({})
    assert type(err.value) is error
    assert str(err.value) == f"POST /policy: HTTP {status}: decode policy: bad"
    if isinstance(err.value, ServerRejected):
        assert err.value.status == status


@pytest.mark.parametrize("body", [b"not json", b"[1]"])
async def test_a_snapshot_that_is_not_a_json_object_is_unavailable(
    recorder: tuple[Recorder, str], body: bytes
) -> None:
    rec, url = recorder
    rec.body = body
    async with ServerClient(ServerClientSettings(url=url, token_file=None)) as client:
        with pytest.raises(ServerUnavailable, match="GET /snapshot"):
            await client.snapshot()


async def test_connection_refused_is_unavailable(unused_tcp_port: int) -> None:
    settings = ServerClientSettings(url=f"http://127.0.0.1:{unused_tcp_port}", token_file=None)
    async with ServerClient(settings) as client:
        with pytest.raises(ServerUnavailable, match="GET /snapshot: ClientConnectorError"):
            await client.snapshot()


async def test_a_hanging_server_times_out_as_unavailable(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    rec.hang = asyncio.Event()
    async with ServerClient(ServerClientSettings(url=url, token_file=None, timeout_s=0.05)) as client:
        with pytest.raises(ServerUnavailable, match=r"timed out after 0\.05s"):
            await client.snapshot()


@pytest.mark.parametrize("kw", [{"url": "inference-cache-server:8081"}, {"timeout_s": 0}])
def test_settings_are_checked(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerClientSettings(**kw)


def test_defaults_match_the_operator_deployment() -> None:
    manifest = (Path(__file__).resolve().parents[2] / "config" / "manager" / "operator.yaml").read_text()
    settings = ServerClientSettings()
    assert str(settings.token_file) == server_client.DEFAULT_TOKEN_FILE
    assert f"mountPath: {Path(server_client.DEFAULT_TOKEN_FILE).parent}" in manifest
    assert "audience: inferencecache.io/controller" in manifest
    assert settings.url.endswith(":8081")
