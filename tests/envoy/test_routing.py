"""Requests through a real Envoy running each shipped config land where the picker says.

Real: Envoy, gRPC ext_proc, HTTP. Stand-ins: the picker (``StubPicker``, always engine #2
unless told otherwise) and two echo engines (``conftest.py``). We test: the chosen engine
answers (POST and bodiless GET); a client-sent destination header neither reaches the
picker nor chooses; 1 MB bodies pass in both body modes; the fail-open config keeps
serving, by round robin over its members only, when the picker is down or names a
non-member, and retries a dead chosen engine on the others; the fail-closed configs refuse
when the picker is down; the process is stopped.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Iterator

import aiohttp
import pytest

from inference_cache import envoy

from .conftest import CONFIGS, DESTINATION, EchoEngine, StartEnvoy, StubPicker, answer

MB = 1024 * 1024


@contextlib.contextmanager
def refusing_port() -> Iterator[str]:
    """A loopback address nothing listens on (a bound, non-listening socket holds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", data=io.BytesIO(body), headers=headers) as resp,
    ):
        return resp.status, await resp.read()


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_request_lands_on_the_chosen_engine(
    name: str, engines: list[EchoEngine], picker: StubPicker, start_envoy: StartEnvoy
) -> None:
    proxy = await start_envoy(name, extproc=picker.address, engines=[e.address for e in engines])
    for _ in range(3):  # more than one: round robin would alternate
        status, body = await post(proxy.url, b'{"model": "m", "prompt": "hello"}')
        assert status == 200, body
        assert answer(body) == {"engine": "engine-2", "body_bytes": 33, "destination": engines[1].address}
    assert [(s.headers[":path"], s.body_bytes, s.served) for s in picker.seen] == [
        ("/v1/completions", 33, engines[1].address)
    ] * 3
    assert engines[0].requests == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_bodiless_request_is_routed_at_its_headers(
    name: str, engines: list[EchoEngine], picker: StubPicker, start_envoy: StartEnvoy
) -> None:
    proxy = await start_envoy(name, extproc=picker.address, engines=[e.address for e in engines])
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/v1/models") as resp:
        assert resp.status == 200
        assert answer(await resp.read())["engine"] == "engine-2"


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_client_sent_destination_is_stripped(
    name: str, engines: list[EchoEngine], picker: StubPicker, start_envoy: StartEnvoy
) -> None:
    proxy = await start_envoy(name, extproc=picker.address, engines=[e.address for e in engines])
    spoofed = {
        DESTINATION: engines[0].address,
        f"{DESTINATION}-subset": engines[0].address,
        f"{DESTINATION}-served": engines[0].address,
    }
    status, body = await post(proxy.url, b'{"model": "m"}', headers=spoofed)
    assert status == 200, body
    assert answer(body)["engine"] == "engine-2"
    (seen,) = picker.seen
    assert not [h for h in seen.headers if h.startswith(DESTINATION)]
    assert engines[0].requests == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_megabyte_body_passes(
    name: str, engines: list[EchoEngine], picker: StubPicker, start_envoy: StartEnvoy
) -> None:
    proxy = await start_envoy(name, extproc=picker.address, engines=[e.address for e in engines])
    prompt = b'{"model": "m", "prompt": "' + b"x" * (3 * MB // 2) + b'"}'
    status, body = await post(proxy.url, prompt)
    assert status == 200, body[:200]
    assert answer(body) == {
        "engine": "engine-2",
        "body_bytes": len(prompt),
        "destination": engines[1].address,
    }
    assert picker.seen[0].body_bytes == len(prompt)


async def test_override_host_keeps_serving_with_the_picker_down(
    engines: list[EchoEngine], start_envoy: StartEnvoy
) -> None:
    with refusing_port() as down:
        proxy = await start_envoy("override-host", extproc=down, engines=[e.address for e in engines])
        # Even now a client cannot choose: its header is gone, round robin spreads.
        answered = []
        for _ in range(4):
            status, body = await post(proxy.url, b'{"model": "m"}', headers={DESTINATION: engines[0].address})
            assert status == 200, body
            answered.append(answer(body)["engine"])
    assert sorted(answered) == ["engine-1", "engine-1", "engine-2", "engine-2"]
    stats = await proxy.stats()
    assert stats["http.llm.ext_proc.failure_mode_allowed"] == 4


async def test_override_host_never_leaves_the_cluster(
    engines: list[EchoEngine], picker: StubPicker, start_envoy: StartEnvoy
) -> None:
    with refusing_port() as outsider:
        picker.choose = outsider
        proxy = await start_envoy(
            "override-host", extproc=picker.address, engines=[e.address for e in engines]
        )
        answered = set()
        for _ in range(2):
            status, body = await post(proxy.url, b'{"model": "m"}')
            assert status == 200, body
            answered.add(answer(body)["engine"])
    assert answered == {"engine-1", "engine-2"}  # round robin fallback, the outsider never tried


async def test_override_host_retries_a_dead_engine_on_the_others(
    engines: list[EchoEngine], picker: StubPicker, start_envoy: StartEnvoy
) -> None:
    with refusing_port() as dead:
        picker.choose = dead
        members = [dead, *(e.address for e in engines)]
        proxy = await start_envoy("override-host", extproc=picker.address, engines=members)
        for _ in range(3):
            status, body = await post(proxy.url, b'{"model": "m"}')
            assert status == 200, body
    assert engines[0].requests + engines[1].requests == 3


@pytest.mark.parametrize("name", ["buffered", "duplex"])
async def test_original_dst_configs_fail_closed(name: str, start_envoy: StartEnvoy) -> None:
    with refusing_port() as down:
        proxy = await start_envoy(name, extproc=down)
        status, _ = await post(proxy.url, b'{"model": "m"}')
    assert status == 500


async def test_envoy_process_stops_envoy(picker: StubPicker) -> None:
    config = envoy.loopback(envoy.load_config(CONFIGS["buffered"]), extproc=picker.address)
    async with envoy.EnvoyProcess(config) as proxy:
        pid = proxy.pid
        assert pid is not None
        assert proxy.url.startswith("http://127.0.0.1:") and proxy.admin_url.startswith("http://127.0.0.1:")
        assert (await proxy.stats())["server.state"] == 0  # LIVE
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert proxy.pid is None


async def test_envoy_process_reports_a_failed_start() -> None:
    config = envoy.load_config(CONFIGS["buffered"])
    config["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    with pytest.raises(envoy.EnvoyError, match="NOT_A_TYPE"):
        async with envoy.EnvoyProcess(envoy.loopback(config, extproc="127.0.0.1:1")):
            pass
