"""The docker-compose topology run on loopback: what compose runs is what this test runs.

Every process is the compose service's own command (``topology.argv``: the image's
entrypoint, the service's command), rewritten by ``topology.rewrite_argv`` in its addresses,
ports and container paths only: four ``inference-cache fake-engine`` processes, one
``inference-cache serve`` on the compose's ``serve-compose.yaml`` (engine addresses replaced
by the loopback ones), a real Envoy on the Envoy config the compose mounts
(``inference_cache.envoy.loopback``), and the client script against Envoy. Its printed output
must show every follow-up on the engine that served its first turn, with cached tokens.
Listeners on 127.0.0.1 with ephemeral ports; every process is stopped (SIGTERM, then kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference_cache import envoy

from . import topology

VENV_BIN = Path(sys.executable).parent
START_S = 60.0
CLIENT_S = 90.0
STOP_GRACE_S = 5.0
ENGINES = ("engine-1", "engine-2", "engine-3", "engine-4")
QWEN_HOST = topology.REPO / ".cache" / "tokenizers" / "qwen"

_ENGINE_STARTED = re.compile(
    r"fake engine \S+ on http://(?P<http>[\d.]+:\d+); kv events tcp://(?P<events>[\d.]+:\d+), "
    r"replay tcp://(?P<replay>[\d.]+:\d+)"
)


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


async def _stop(proc: Proc) -> None:
    if proc.process.returncode is None:
        proc.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.process.wait(), STOP_GRACE_S)
        except TimeoutError:
            proc.process.kill()
            await proc.process.wait()


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[[str, Sequence[str]], Any]]:
    """``await spawn(name, argv)``: a subprocess logging stdout+stderr to a file, stopped at
    the end of the test."""
    started: list[Proc] = []

    async def start(name: str, args: Sequence[str]) -> Proc:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:  # a local file, opened once per process
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT
            )
        proc = Proc(name, process, log)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        await asyncio.gather(*(_stop(p) for p in reversed(started)))


async def _wait_for(proc: Proc, parse: Callable[[str], dict[str, str] | None]) -> dict[str, str]:
    """Poll the process's log until ``parse`` finds what it started with (bounded)."""
    deadline = time.monotonic() + START_S
    while True:
        if found := parse(proc.text()):
            return found
        if proc.process.returncode is not None:
            raise AssertionError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} did not start within {START_S}s:\n{proc.text()}")
        await asyncio.sleep(0.05)


def _engine_started(text: str) -> dict[str, str] | None:
    match = _ENGINE_STARTED.search(text)
    return match.groupdict() if match else None


def _server_started(text: str) -> dict[str, str] | None:
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("msg") == "startup":
                return {"extproc": record["extproc_addr"], "http": record["http_addr"]}
    return None


def _image() -> tuple[list[str], dict[str, Path]]:
    """The image's entrypoint, and the paths it holds mapped to their host equivalents (the
    Qwen tokenizer the ``tokenizer`` stage builds = ``make tokenizer``'s, same script)."""
    instructions = topology.final_stage(
        topology.dockerfile_instructions(topology.DOCKERFILE.read_text(encoding="utf-8"))
    )
    entrypoint = json.loads(next(rest for keyword, rest in instructions if keyword == "ENTRYPOINT"))
    built = {target: QWEN_HOST for target in topology.image_paths(instructions)}
    return entrypoint, built


@pytest.mark.parametrize("envoy_config", topology.ENVOY_CONFIGS)
async def test_compose_topology_on_loopback(
    envoy_config: str, spawn: Callable[[str, Sequence[str]], Any], tmp_path: Path
) -> None:
    assert (QWEN_HOST / "tokenizer.json").exists(), "run `make tokenizer` (make test does) first"
    compose = topology.load_compose(env={"ENVOY_CONFIG": envoy_config})
    services = compose["services"]
    entrypoint, image_paths = _image()
    programs = {entrypoint[0]: str(VENV_BIN / entrypoint[0]), "python": sys.executable}
    listen = "127.0.0.1:0"

    # The engines: HTTP and ZMQ on loopback, ports chosen by the OS and read back.
    compose_to_loopback: dict[str, str] = {}
    engine_http = []
    for name in ENGINES:
        service = services[name]
        args = topology.rewrite_argv(
            topology.argv(service, entrypoint),
            flags={
                "--host": "127.0.0.1",
                "--port": "0",
                "--kv-events-endpoint": "tcp://127.0.0.1:*",
                "--replay-endpoint": "tcp://127.0.0.1:*",
            },
            paths={**image_paths, **topology.volumes(service)},
            programs=programs,
        )
        started = await _wait_for(await spawn(name, args), _engine_started)
        ip = topology.static_ip(service)
        compose_to_loopback |= {
            f"{ip}:8000": started["http"],
            f"{ip}:5557": started["events"],
            f"{ip}:5558": started["replay"],
        }
        engine_http.append(started["http"])

    # The server: the compose's config file with the engines' loopback addresses.
    server = services["extproc"]
    mounts = topology.volumes(server)
    config_path = topology.flag_value(topology.argv(server, entrypoint), "--config")
    config = yaml.safe_load(mounts[config_path].read_text(encoding="utf-8"))
    loopback_config = tmp_path / "serve.yaml"
    loopback_config.write_text(
        yaml.safe_dump(
            topology.rewrite_strings(
                config, {**compose_to_loopback, **{k: str(v) for k, v in image_paths.items()}}
            )
        ),
        encoding="utf-8",
    )
    args = topology.rewrite_argv(
        topology.argv(server, entrypoint),
        flags={
            "--config": str(loopback_config),
            "--extproc-bind-address": listen,
            "--grpc-bind-address": listen,
            "--http-bind-address": listen,
            "--snapshot-bind-address": listen,
        },
        programs=programs,
    )
    addresses = await _wait_for(await spawn("extproc", args), _server_started)

    # Envoy: the very file the compose mounts for ENVOY_CONFIG, on loopback.
    envoy_mounts = topology.volumes(services["envoy"])
    shipped = envoy.load_config(envoy_mounts["/etc/envoy/envoy.yaml"])
    assert envoy_mounts["/etc/envoy/envoy.yaml"].name == envoy_config
    rewritten = envoy.loopback(shipped, extproc=addresses["extproc"], engines=engine_http)
    async with envoy.EnvoyProcess(rewritten) as proxy:
        client = services["client"]
        args = topology.rewrite_argv(
            topology.argv(client, entrypoint),
            flags={"--url": proxy.url},
            paths=topology.volumes(client),
            programs=programs,
        )
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CLIENT_S)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        text = output.decode()
        print(text)  # shown by pytest -rP / on failure
        assert process.returncode == 0, text
    conversations = int(topology.flag_value(args, "--conversations"))
    topology.check_client_run(topology.parse_client_output(text), conversations, engine_http)
