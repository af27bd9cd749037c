"""The operator's HTTP client for the server's controller listener.

Owner: ``inference_cache.operator`` (the seam between the control-plane loops and
``inference-cache serve``). Place in the flow::

    handlers_controlplane ──GET /snapshot──►  server :8081  (index.snapshot wire format)
                          ──POST /policy───►                (extproc.policy_wire v7)
                          ──PUT /templates─►                (extproc.templates, replace-on-write)

Every request carries ``Authorization: Bearer <token>``, the projected ServiceAccount token
(audience ``inferencecache.io/controller``) read from its file on *each* call: the kubelet
rotates it in place. Failures are translated once, here: :class:`ServerUnavailable` (no
connection, timeout, 5xx, unreadable token; retry on the next tick) and
:class:`ServerRejected` (a 4xx: the server refused what we sent, or our identity). The
callers never see aiohttp exceptions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp

from inference_cache.extproc import templates as templates_wire
from inference_cache.operator.metrics import (
    METRICS,
    REQUEST_OK,
    REQUEST_REJECTED,
    REQUEST_UNAVAILABLE,
    OperatorMetrics,
)

#: The server's controller listener, from the operator's namespace (config/manager/operator.yaml).
DEFAULT_SERVER_URL: Final = "http://inference-cache-server:8081"
#: The projected controller token (config/manager/operator.yaml, audience inferencecache.io/controller).
DEFAULT_TOKEN_FILE: Final = "/var/run/secrets/inferencecache.io/controller-token/token"
#: Whole-request timeout, seconds (a snapshot of a large index is a few MiB).
DEFAULT_TIMEOUT_S: Final = 10.0
_ERROR_TEXT_LIMIT: Final = 512


class ServerError(Exception):
    """A controller-listener call failed; ``str()`` says which call and why."""


class ServerUnavailable(ServerError):
    """Transient: connection refused or reset, timeout, a 5xx, or no readable token."""


class ServerRejected(ServerError):
    """The server answered 4xx: a body it cannot decode (400) or our identity (401/403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ServerClientSettings:
    """Where the server is and how to authenticate; ``token_file=None`` sends no token
    (a server run with ``insecure_disable_auth``, development only)."""

    url: str = DEFAULT_SERVER_URL
    token_file: Path | None = Path(DEFAULT_TOKEN_FILE)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"server url must be http(s)://host:port, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


class ServerClient:
    """One aiohttp session for the operator's lifetime: ``async with ServerClient(s) as c``
    or :meth:`close` when done. Every call is counted in ``metrics.server_requests``
    (``call``: the path without its ``/``; ``result``: ok, unavailable, rejected)."""

    def __init__(self, settings: ServerClientSettings, *, metrics: OperatorMetrics = METRICS) -> None:
        self.settings = settings
        self.metrics = metrics
        self._base = settings.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def snapshot(self) -> dict[str, Any]:
        """``GET /snapshot``: the index snapshot as decoded JSON."""
        body = await self._call("GET", "/snapshot")
        try:
            decoded = json.loads(body)
        except ValueError as e:
            raise ServerUnavailable(f"GET /snapshot: not JSON: {e}") from None
        if not isinstance(decoded, dict):
            raise ServerUnavailable("GET /snapshot: expected a JSON object")
        return decoded

    async def push_policy(self, payload: Mapping[str, Any]) -> None:
        """``POST /policy`` with ``controlplane.policy_payload``'s body."""
        await self._call("POST", "/policy", json.dumps(payload).encode())

    async def put_templates(self, stored: Sequence[templates_wire.StoredTemplate]) -> None:
        """``PUT /templates``: the whole set (the server replaces its own with it)."""
        await self._call("PUT", "/templates", templates_wire.encode(stored))

    def _headers(self, method: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if method != "GET" else {}
        path = self.settings.token_file
        if path is None:
            return headers
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ServerUnavailable(f"controller token {path}: {e}") from None
        if not token:
            raise ServerUnavailable(f"controller token {path}: empty")
        headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        try:
            data = await self._request(method, path, body)
        except ServerRejected:
            self.metrics.server_requests.labels(path.lstrip("/"), REQUEST_REJECTED).inc()
            raise
        except ServerUnavailable:
            self.metrics.server_requests.labels(path.lstrip("/"), REQUEST_UNAVAILABLE).inc()
            raise
        self.metrics.server_requests.labels(path.lstrip("/"), REQUEST_OK).inc()
        return data

    async def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        what = f"{method} {path}"
        headers = self._headers(method)
        if self._session is None:  # created inside the running loop
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
            )
        try:
            async with self._session.request(method, self._base + path, data=body, headers=headers) as resp:
                data = await resp.read()
                status = resp.status
        except TimeoutError:
            raise ServerUnavailable(f"{what}: timed out after {self.settings.timeout_s:g}s") from None
        except aiohttp.ClientError as e:
            raise ServerUnavailable(f"{what}: {type(e).__name__}: {e}") from None
        if status < 300:
            return data
        text = data[:_ERROR_TEXT_LIMIT].decode("utf-8", "replace").strip()
        message = f"{what}: HTTP {status}: {text}"
        if 400 <= status < 500:
            raise ServerRejected(message, status)
        raise ServerUnavailable(message)
