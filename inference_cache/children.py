"""A child process the benchmarks start and stop (peer routers, fake engines), and a free
loopback port to give it.

Owner: ``inference_cache`` (used by ``livebench`` and ``extproc.bench``). Output goes to a
log file (``tail`` for error messages); the child gets its own session, and ``stop`` sends
SIGTERM, then SIGKILL to its process group after ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from inference_cache import envoy

#: Seconds between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A loopback port free right now (for a child that takes no port 0)."""
    with socket.socket() as s:
        s.bind((envoy.LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """One child process (output to ``log``); an async context manager too."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        grace: float = STOP_GRACE_S,
    ) -> None:
        self.name, self.command, self.log, self.env = name, list(command), log, env
        self.grace = grace
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Child:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
