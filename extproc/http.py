"""aiohttp applications for the server's two HTTP listeners.

Owner: ``inference_cache.extproc``. The composition root (``extproc.serve``) builds both
apps and runs them on ``--http-bind-address`` (public) and ``--snapshot-bind-address``
(controller-only, behind a NetworkPolicy and ServiceAccount auth). This module knows
nothing about the index: it gets the ``/snapshot`` body from ``snapshot_json`` (the index's
pure encoder), readiness from ``is_ready``, writes ``/policy`` into the ``PolicyStore`` and
``/templates`` into the ``TemplateStore``.

Public (the original's ``:8080``)::

    /healthz  any method  200 "ok\\n"
    /readyz   any method  200 "ok\\n" | 503 "not ready\\n"
    /metrics  GET         Prometheus text exposition of the injected registry

Controller (``:8081``), each route behind its own ``auth.Authenticator`` (or open when
auth is disabled); authentication runs before the method check, as in the original::

    /snapshot  GET only (405, Allow: GET)        200 application/json; encoder error -> 500
    /policy    POST|PUT (405, Allow: POST, PUT)  204; body > 1 MiB or undecodable -> 400
    /templates PUT only (405, Allow: PUT)        204 (replace-on-write); body > 1 MiB or
               undecodable -> 400 with the path and message (``templates.decode``)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from inference_cache.extproc import auth, policy_wire
from inference_cache.extproc import templates as templates_mod
from inference_cache.index.policy import PolicyStore

#: ``/policy`` body cap (the original's ``http.MaxBytesReader`` limit).
MAX_POLICY_BODY_BYTES: Final = 1 << 20
#: ``/templates`` body cap (the same as ``/policy``).
MAX_TEMPLATES_BODY_BYTES: Final = 1 << 20

Handler = auth.Handler


def _text(status: int, text: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, headers=headers)


# -- public -------------------------------------------------------------------------


def build_public_app(*, is_ready: Callable[[], bool], registry: CollectorRegistry) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics``; nothing else (``/snapshot`` is a 404 here)."""

    async def healthz(_: web.Request) -> web.Response:
        return _text(200, "ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return _text(200, "ok\n") if is_ready() else _text(503, "not ready\n")

    async def metrics(_: web.Request) -> web.Response:
        # The classic text format, as prometheus_client's own handler serves by default.
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )

    app = web.Application()
    app.router.add_route("*", "/healthz", healthz)
    app.router.add_route("*", "/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


# -- controller ---------------------------------------------------------------------


def snapshot_handler(snapshot_json: Callable[[], bytes]) -> Handler:
    async def snapshot(request: web.Request) -> web.Response:
        if request.method != "GET":
            return _text(405, "method not allowed\n", headers={"Allow": "GET"})
        try:
            body = snapshot_json()
        except Exception as e:  # the encoder's failure is this request's 500, not the server's
            return _text(500, f"encode snapshot: {e}\n")
        return web.Response(body=body, content_type="application/json")

    return snapshot


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or ``None`` as soon as it exceeds ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def policy_handler(store: PolicyStore) -> Handler:
    async def policy(request: web.Request) -> web.Response:
        if request.method not in ("POST", "PUT"):
            return _text(405, "method not allowed\n", headers={"Allow": "POST, PUT"})
        body = await _read_capped(request, MAX_POLICY_BODY_BYTES)
        if body is None:
            return _text(400, "decode policy snapshot: http: request body too large\n")
        try:
            snap = policy_wire.decode(body)
        except policy_wire.UnsupportedPolicyVersionError as e:
            return _text(400, f"{e}\n")
        except policy_wire.PolicyDecodeError as e:
            return _text(400, f"decode policy snapshot: {e}\n")
        store.replace(snap.policies, snap.tenants)
        return web.Response(status=204)

    return policy


def templates_handler(store: templates_mod.TemplateStore) -> Handler:
    async def put_templates(request: web.Request) -> web.Response:
        if request.method != "PUT":
            return _text(405, "method not allowed\n", headers={"Allow": "PUT"})
        body = await _read_capped(request, MAX_TEMPLATES_BODY_BYTES)
        if body is None:
            return _text(400, "decode templates: request body too large\n")
        try:
            decoded = templates_mod.decode(body)
        except templates_mod.TemplateDecodeError as e:
            return _text(400, f"decode templates: {e}\n")
        store.replace(decoded)
        return web.Response(status=204)

    return put_templates


def build_controller_app(
    *,
    snapshot_json: Callable[[], bytes],
    policies: PolicyStore,
    snapshot_auth: auth.Authenticator | None,
    policy_auth: auth.Authenticator | None,
    templates: templates_mod.TemplateStore | None = None,
    templates_auth: auth.Authenticator | None = None,
) -> web.Application:
    """``/snapshot``, ``/policy`` and (with a store) ``/templates``, each behind its own
    authenticator (``None``: open)."""

    def guard(authn: auth.Authenticator | None, handler: Handler) -> Handler:
        return handler if authn is None else authn.protect(handler)

    app = web.Application()
    app.router.add_route("*", "/snapshot", guard(snapshot_auth, snapshot_handler(snapshot_json)))
    app.router.add_route("*", "/policy", guard(policy_auth, policy_handler(policies)))
    if templates is not None:
        app.router.add_route("*", "/templates", guard(templates_auth, templates_handler(templates)))
    return app
