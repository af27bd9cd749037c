"""ServiceAccount bearer-token authentication for the controller-only listener and the
producer (write) RPCs.

Owner: ``inference_cache.extproc``. ``extproc.http`` wraps ``/snapshot``, ``/policy`` and
``/templates`` each in its own :class:`Authenticator` (separate caches and result counters);
``extproc.serve``'s producer auth chains one per ``--allowed-producer-sa``. The composition
root (``extproc.serve``) builds the :class:`KubeTokenReviewer` from the in-cluster config and
checks the startup flags with :func:`validate_controller_auth_flags` (exit 2 on a message).

Per request, exactly one result is reported to ``on_result`` (the original's
``pkg/server/auth/middleware.go``):

1. ``Authorization: Bearer <token>`` (scheme case-insensitive, split on the first space,
   token trimmed); missing or malformed -> 401 ``unauthorized``, ``unauth``.
2. A cached success for ``hex(sha256(token))`` that has not expired -> ``ok``.
3. ``POST /apis/authentication.k8s.io/v1/tokenreviews`` with ``spec.token`` and
   ``spec.audiences=[audience]`` (omitted when the audience is empty). Transport or API
   failure -> 503 ``token review unavailable`` (fail closed), ``error``.
4. ``status.authenticated`` false -> 401, ``unauth``; a non-empty ``status.error`` (e.g. the
   wrong-audience diagnostic) is logged at WARN as ``auth_token_review_unauthenticated``.
5. ``status.user.username`` is not the expected ServiceAccount -> 403 ``forbidden``.
6. Otherwise cache the success for 30 s (at most 32 entries: prune expired, then evict the
   soonest-expiring) -> ``ok`` and run the handler.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

#: TokenReview audience for the read side (``/snapshot``), ``--controller-audience``.
CONTROLLER_AUDIENCE: Final = "inferencecache.io/controller"
#: How long a successful review is reused (one review per controller poll).
DEFAULT_CACHE_TTL_S: Final = 30.0
#: Cache bound; steady state is one token per endpoint, the rest absorbs rotation churn.
DEFAULT_CACHE_MAX_ENTRIES: Final = 32

TOKENREVIEW_PATH: Final = "/apis/authentication.k8s.io/v1/tokenreviews"
#: Where a pod's ServiceAccount credentials are mounted.
IN_CLUSTER_SA_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuthResult(enum.StrEnum):
    """The ``result`` label of ``inferencecache_{snapshot,policy,templates,producer}_auth_total``."""

    OK = "ok"
    UNAUTH = "unauth"
    FORBIDDEN = "forbidden"
    ERROR = "error"


# -- the Kubernetes side ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenReviewStatus:
    """The parts of ``TokenReview.status`` the authenticator reads."""

    authenticated: bool
    username: str = ""
    error: str = ""


class TokenReviewError(Exception):
    """The review did not happen (transport error, non-2xx, unreadable response)."""


class TokenReviewer(Protocol):
    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewStatus: ...


class InClusterConfigError(Exception):
    """Not running in a pod, or the ServiceAccount mount is unusable."""


@dataclass(frozen=True, slots=True)
class KubeAPIConfig:
    """How to reach the Kubernetes API server."""

    #: ``https://host:port`` (or ``http://`` in tests), no trailing path.
    base_url: str
    #: Bearer token for the API server; ``token_file`` instead is re-read on every review,
    #: so kubelet's projected-token rotation is picked up. Neither: anonymous.
    token: str | None = None
    token_file: Path | None = None
    #: CA bundle to verify the API server; ``None`` uses the system trust store.
    ca_file: Path | None = None
    #: Bound on one TokenReview round trip.
    timeout_s: float = 10.0


def in_cluster_config(
    environ: Mapping[str, str] = os.environ, *, sa_dir: Path = IN_CLUSTER_SA_DIR
) -> KubeAPIConfig:
    """The pod's own API config (``KUBERNETES_SERVICE_HOST/PORT`` + mounted SA token and CA)."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise InClusterConfigError(
            "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT must be defined"
        )
    token_file, ca_file = sa_dir / "token", sa_dir / "ca.crt"
    for path in (token_file, ca_file):
        if not path.is_file():
            raise InClusterConfigError(f"unable to load in-cluster configuration: {path} is missing")
    host = f"[{host}]" if ":" in host else host
    return KubeAPIConfig(base_url=f"https://{host}:{port}", token_file=token_file, ca_file=ca_file)


class KubeTokenReviewer:
    """``TokenReviewer`` over aiohttp. Use as ``async with`` (or call :meth:`close`)."""

    def __init__(self, config: KubeAPIConfig) -> None:
        self._config = config
        self._ssl = ssl.create_default_context(cafile=config.ca_file) if config.ca_file else True
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeTokenReviewer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _bearer(self) -> str | None:
        if self._config.token_file is not None:
            try:
                return self._config.token_file.read_text().strip()
            except OSError as e:
                raise TokenReviewError(f"read API token {self._config.token_file}: {e}") from e
        return self._config.token

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewStatus:
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        headers = {"Accept": "application/json"}
        bearer = self._bearer()
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._config.timeout_s))
        url = self._config.base_url.rstrip("/") + TOKENREVIEW_PATH
        try:
            async with self._session.post(url, json=body, headers=headers, ssl=self._ssl) as resp:
                if resp.status // 100 != 2:
                    raise TokenReviewError(f"TokenReview: HTTP {resp.status}: {(await resp.text())[:256]}")
                reply = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise TokenReviewError(f"TokenReview: {e!r}") from e
        return _parse_status(reply)


def _parse_status(reply: object) -> TokenReviewStatus:
    """``status`` of a TokenReview reply; absent parts read as their zero values, as in Go."""
    if not isinstance(reply, dict):
        raise TokenReviewError("TokenReview: reply is not an object")
    status = reply.get("status") or {}
    if not isinstance(status, dict):
        raise TokenReviewError("TokenReview: malformed status")
    user = status.get("user") or {}
    if not isinstance(user, dict):
        raise TokenReviewError("TokenReview: malformed status.user")
    authenticated, username, error = status.get("authenticated"), user.get("username"), status.get("error")
    return TokenReviewStatus(
        authenticated=authenticated is True,
        username=username if isinstance(username, str) else "",
        error=error if isinstance(error, str) else "",
    )


# -- the HTTP side ------------------------------------------------------------------


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None`` if malformed."""
    if not header:
        return None
    scheme, sep, token = header.partition(" ")
    if not sep or scheme.lower() != "bearer":
        return None
    return token.strip() or None


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_REJECTIONS: Final = {
    AuthResult.UNAUTH: (401, "unauthorized\n"),
    AuthResult.FORBIDDEN: (403, "forbidden\n"),
    AuthResult.ERROR: (503, "token review unavailable\n"),
}


class Authenticator:
    """Admits only ``expected_sa`` tokens minted for ``audience``; one instance per endpoint."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        *,
        expected_sa: str,
        audience: str,
        on_result: Callable[[str], None] | None = None,
        clock: Clock = time.monotonic,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
    ) -> None:
        if not expected_sa:
            raise ValueError("expected_sa is required")
        if cache_ttl_s <= 0 or cache_max_entries <= 0:
            raise ValueError("cache_ttl_s and cache_max_entries must be positive")
        self._reviewer = reviewer
        self._expected_sa = expected_sa
        self._audiences = (audience,) if audience else ()
        self._on_result = on_result
        self._clock = clock
        self._ttl_s = cache_ttl_s
        self._max_entries = cache_max_entries
        #: hex(sha256(token)) -> expiry on ``clock``.
        self._cache: dict[str, float] = {}

    @property
    def cached_entries(self) -> int:
        return len(self._cache)

    async def authenticate(self, authorization: str | None) -> AuthResult:
        """Decide one request from its ``Authorization`` header; reports the result."""
        result = await self._decide(authorization)
        if self._on_result is not None:
            self._on_result(result)
        return result

    def protect(self, handler: Handler) -> Handler:
        """``handler`` behind this authenticator: rejections answer 401/403/503 as text."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            result = await self.authenticate(request.headers.get("Authorization"))
            if result is AuthResult.OK:
                return await handler(request)
            status, text = _REJECTIONS[result]
            return web.Response(status=status, text=text)

        return guarded

    async def _decide(self, authorization: str | None) -> AuthResult:
        token = parse_bearer(authorization)
        if token is None:
            return AuthResult.UNAUTH
        key = token_key(token)
        if self._cache_hit(key):
            return AuthResult.OK
        try:
            status = await self._reviewer.review(token, self._audiences)
        except TokenReviewError as e:
            logger.debug("auth_token_review_failed", extra={"error": str(e)})
            return AuthResult.ERROR
        if not status.authenticated:
            if status.error:
                logger.warning("auth_token_review_unauthenticated", extra={"error": status.error})
            return AuthResult.UNAUTH
        if status.username != self._expected_sa:
            return AuthResult.FORBIDDEN
        self._cache_put(key)
        return AuthResult.OK

    def _cache_hit(self, key: str) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if self._clock() >= expires:
            del self._cache[key]
            return False
        return True

    def _cache_put(self, key: str) -> None:
        now = self._clock()
        if key not in self._cache and len(self._cache) >= self._max_entries:
            self._cache = {k: exp for k, exp in self._cache.items() if now < exp}
            if len(self._cache) >= self._max_entries:
                del self._cache[min(self._cache, key=self._cache.__getitem__)]
        self._cache[key] = now + self._ttl_s


# -- startup flag rules -------------------------------------------------------------


def validate_controller_auth_flags(
    *,
    allowed_controller_sa: str,
    insecure_disable_auth: bool,
    controller_audience: str,
) -> str | None:
    """The fail-closed flag rules (``validateControllerAuthFlags``): a message, or ``None``."""
    sa = allowed_controller_sa
    if sa and insecure_disable_auth:
        return "--allowed-controller-sa and --insecure-disable-auth are mutually exclusive"
    if not sa and not insecure_disable_auth:
        return (
            "missing --allowed-controller-sa; pass --insecure-disable-auth to run /snapshot and "
            "/policy without authentication (local development only)"
        )
    if not sa:
        return None
    if sa.strip() != sa:
        return (
            f"--allowed-controller-sa has leading/trailing whitespace ({sa!r}); the apiserver returns "
            "SA usernames without whitespace, so this value would never match and every controller "
            "request would 403"
        )
    if not controller_audience.strip():
        return (
            "--controller-audience cannot be empty or whitespace-only when --allowed-controller-sa is "
            "set; an empty/blank audience would silently disable the defense-in-depth gate that pairs "
            "with TokenReview.Audiences"
        )
    if controller_audience.strip() != controller_audience:
        return (
            f"--controller-audience has leading/trailing whitespace ({controller_audience!r}); the JWT-baked "
            "audience will not match this value and the server would produce a runtime 401 loop "
            "instead of the fail-fast operators expect"
        )
    return None
