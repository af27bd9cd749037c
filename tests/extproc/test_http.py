"""``extproc.http``: the public and controller aiohttp apps, over real sockets.

Each app runs on a real aiohttp server on 127.0.0.1 (``aiohttp.test_utils.TestServer``)
and is driven by a real ``aiohttp.ClientSession``. The index is not involved: the
snapshot body and readiness are plain callables, the policy store is the real one. Auth
uses the real ``Authenticator`` over an in-process ``TokenReviewer`` (the TokenReview
HTTP client itself is tested against a fake API server in test_auth.py).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter

from inference_cache.extproc import auth, policy_wire, templates
from inference_cache.extproc import http as ic_http
from inference_cache.index.policy import NamespacePolicy, PolicyStore, TenantQuota

CONTROLLER_SA = "system:serviceaccount:inference-cache-system:inference-cache-controller-manager"
#: The write side's audience in these tests: each endpoint checks its own authenticator.
WRITE_AUDIENCE = "inferencecache.io/policy"
SNAPSHOT_BODY = b'{"generatedAt":"2026-01-01T00:00:00Z","entries":[]}\n'
POLICY_BODY = policy_wire.encode([NamespacePolicy(namespace="team-a", eviction="lfu")], [TenantQuota("t", 5)])


class InProcessReviewer:
    """token -> (username, audience) as minted; ``"apiserver-down"`` fails the review."""

    def __init__(self) -> None:
        self.minted = {
            "read-token": (CONTROLLER_SA, auth.CONTROLLER_AUDIENCE),
            "write-token": (CONTROLLER_SA, WRITE_AUDIENCE),
            "stranger-token": ("system:serviceaccount:default:x", auth.CONTROLLER_AUDIENCE),
        }
        self.calls = 0

    async def review(self, token: str, audiences: Sequence[str]) -> auth.TokenReviewStatus:
        self.calls += 1
        if token == "apiserver-down":
            raise auth.TokenReviewError("connection refused")
        if token not in self.minted:
            return auth.TokenReviewStatus(authenticated=False, error="invalid bearer token")
        user, audience = self.minted[token]
        if audience not in audiences:
            return auth.TokenReviewStatus(authenticated=False, error="token audiences is invalid")
        return auth.TokenReviewStatus(authenticated=True, username=user)


async def _serve(app: web.Application) -> AsyncIterator[aiohttp.ClientSession]:
    async with (
        TestServer(app, host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession(base_url=server.make_url("/")) as client,
    ):
        yield client


class Readiness:
    ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture()
def http_readiness() -> Readiness:
    return Readiness()


@pytest.fixture()
def http_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("inferencecache_test_requests", "A test counter.", registry=registry).inc(3)
    return registry


@pytest.fixture()
async def public_client(
    http_readiness: Readiness, http_registry: CollectorRegistry
) -> AsyncIterator[aiohttp.ClientSession]:
    async for client in _serve(ic_http.build_public_app(is_ready=http_readiness, registry=http_registry)):
        yield client


@pytest.fixture()
def http_policy_store() -> PolicyStore:
    return PolicyStore()


@pytest.fixture()
async def open_controller_client(http_policy_store: PolicyStore) -> AsyncIterator[aiohttp.ClientSession]:
    app = ic_http.build_controller_app(
        snapshot_json=lambda: SNAPSHOT_BODY, policies=http_policy_store, snapshot_auth=None, policy_auth=None
    )
    async for client in _serve(app):
        yield client


@pytest.fixture()
def http_reviewer() -> InProcessReviewer:
    return InProcessReviewer()


@pytest.fixture()
def auth_counts() -> dict[str, list[str]]:
    return {"snapshot": [], "policy": []}


@pytest.fixture()
async def authed_controller_client(
    http_policy_store: PolicyStore, http_reviewer: InProcessReviewer, auth_counts: dict[str, list[str]]
) -> AsyncIterator[aiohttp.ClientSession]:
    def authenticator(endpoint: str, audience: str) -> auth.Authenticator:
        return auth.Authenticator(
            http_reviewer,
            expected_sa=CONTROLLER_SA,
            audience=audience,
            on_result=auth_counts[endpoint].append,
        )

    app = ic_http.build_controller_app(
        snapshot_json=lambda: SNAPSHOT_BODY,
        policies=http_policy_store,
        snapshot_auth=authenticator("snapshot", auth.CONTROLLER_AUDIENCE),
        policy_auth=authenticator("policy", WRITE_AUDIENCE),
    )
    async for client in _serve(app):
        yield client


# -- public -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
async def test_healthz_any_method(public_client: aiohttp.ClientSession, method: str) -> None:
    async with public_client.request(method, "/healthz") as resp:
        assert (resp.status, await resp.text()) == (200, "ok\n")


async def test_readyz_follows_readiness(
    public_client: aiohttp.ClientSession, http_readiness: Readiness
) -> None:
    async with public_client.get("/readyz") as resp:
        assert (resp.status, await resp.text()) == (503, "not ready\n")
    http_readiness.ready = True
    async with public_client.post("/readyz") as resp:
        assert (resp.status, await resp.text()) == (200, "ok\n")


async def test_metrics_exposes_the_injected_registry(public_client: aiohttp.ClientSession) -> None:
    async with public_client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "inferencecache_test_requests_total 3.0\n" in await resp.text()
    async with public_client.post("/metrics") as resp:
        assert resp.status == 405


@pytest.mark.parametrize(("method", "path"), [("GET", "/snapshot"), ("POST", "/policy"), ("PUT", "/policy")])
async def test_controller_endpoints_are_not_public(
    public_client: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with public_client.request(method, path, data=POLICY_BODY) as resp:
        assert resp.status == 404


# -- controller: /snapshot ----------------------------------------------------------


async def test_snapshot_get(open_controller_client: aiohttp.ClientSession) -> None:
    async with open_controller_client.get("/snapshot") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == SNAPSHOT_BODY


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_snapshot_other_methods_are_405(
    open_controller_client: aiohttp.ClientSession, method: str
) -> None:
    async with open_controller_client.request(method, "/snapshot") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET"


async def test_snapshot_encoder_failure_is_500(http_policy_store: PolicyStore) -> None:
    def broken() -> bytes:
        raise ValueError("cannot encode")

    app = ic_http.build_controller_app(
        snapshot_json=broken, policies=http_policy_store, snapshot_auth=None, policy_auth=None
    )
    async for client in _serve(app):
        async with client.get("/snapshot") as resp:
            assert (resp.status, await resp.text()) == (500, "encode snapshot: cannot encode\n")


# -- controller: /policy ------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_policy_push_replaces_the_store(
    open_controller_client: aiohttp.ClientSession, http_policy_store: PolicyStore, method: str
) -> None:
    async with open_controller_client.request(method, "/policy", data=POLICY_BODY) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    assert http_policy_store.policies() == [NamespacePolicy(namespace="team-a", eviction="lfu")]
    assert http_policy_store.quota("t") == 5
    async with open_controller_client.put("/policy", data=b'{"version":3}') as resp:
        assert resp.status == 204
    assert (http_policy_store.policies(), http_policy_store.quota("t")) == ([], None)


@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
async def test_policy_other_methods_are_405(
    open_controller_client: aiohttp.ClientSession, method: str
) -> None:
    async with open_controller_client.request(method, "/policy") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST, PUT"


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        pytest.param(b'{"version": 8}', "unsupported policy snapshot version\n", id="version"),
        pytest.param(
            b'{"version": 7, "x": 1}', 'decode policy snapshot: unknown field "x"\n', id="unknown-field"
        ),
        pytest.param(
            b'{"version": 7, "policies": [{"namespace": 1}]}',
            "decode policy snapshot: policies[0].namespace: expected a string, got number 1\n",
            id="wrong-type",
        ),
    ],
)
async def test_policy_bad_bodies_are_400_and_leave_the_store(
    open_controller_client: aiohttp.ClientSession, http_policy_store: PolicyStore, body: bytes, reply: str
) -> None:
    http_policy_store.replace([NamespacePolicy(namespace="kept")])
    async with open_controller_client.post("/policy", data=body) as resp:
        assert (resp.status, await resp.text()) == (400, reply)
    assert [p.namespace for p in http_policy_store.policies()] == ["kept"]


MIB = ic_http.MAX_POLICY_BODY_BYTES
TOO_LARGE = "decode policy snapshot: http: request body too large\n"


def _padded(size: int) -> bytes:
    return POLICY_BODY + b" " * (size - len(POLICY_BODY))


async def test_policy_body_of_exactly_1_mib_is_accepted(
    open_controller_client: aiohttp.ClientSession,
) -> None:
    async with open_controller_client.post("/policy", data=io.BytesIO(_padded(MIB))) as resp:
        assert resp.status == 204


async def test_policy_body_over_1_mib_is_400(
    open_controller_client: aiohttp.ClientSession, http_policy_store: PolicyStore
) -> None:
    too_big = _padded(MIB + 1)
    async with open_controller_client.post("/policy", data=io.BytesIO(too_big)) as resp:
        assert (resp.status, await resp.text()) == (400, TOO_LARGE)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the cap is enforced while reading
        for i in range(0, len(too_big), 100_000):
            yield too_big[i : i + 100_000]

    async with open_controller_client.post("/policy", data=chunked()) as resp:
        assert resp.status == 400
    assert http_policy_store.policies() == []


# -- controller: auth ---------------------------------------------------------------


async def test_auth_rejections(
    authed_controller_client: aiohttp.ClientSession, auth_counts: dict[str, list[str]]
) -> None:
    cases = [
        ({}, 401, "unauthorized\n"),
        ({"Authorization": "Basic eDp5"}, 401, "unauthorized\n"),
        ({"Authorization": "Bearer nobody"}, 401, "unauthorized\n"),
        ({"Authorization": "Bearer stranger-token"}, 403, "forbidden\n"),
        ({"Authorization": "Bearer apiserver-down"}, 503, "token review unavailable\n"),
    ]
    for headers, status, text in cases:
        async with authed_controller_client.get("/snapshot", headers=headers) as resp:
            assert (resp.status, await resp.text()) == (status, text), headers
    assert auth_counts == {"snapshot": ["unauth", "unauth", "unauth", "forbidden", "error"], "policy": []}


async def test_each_endpoint_has_its_own_audience_and_counter(
    authed_controller_client: aiohttp.ClientSession,
    http_policy_store: PolicyStore,
    auth_counts: dict[str, list[str]],
) -> None:
    read, write = {"Authorization": "Bearer read-token"}, {"Authorization": "Bearer write-token"}
    async with authed_controller_client.get("/snapshot", headers=read) as resp:
        assert (resp.status, await resp.read()) == (200, SNAPSHOT_BODY)
    async with authed_controller_client.post("/policy", headers=read, data=POLICY_BODY) as resp:
        assert resp.status == 401  # a read-side token cannot push policy
    async with authed_controller_client.get("/snapshot", headers=write) as resp:
        assert resp.status == 401
    async with authed_controller_client.post("/policy", headers=write, data=POLICY_BODY) as resp:
        assert resp.status == 204
    assert [p.namespace for p in http_policy_store.policies()] == ["team-a"]
    assert auth_counts == {"snapshot": ["ok", "unauth"], "policy": ["unauth", "ok"]}


async def test_auth_runs_before_the_method_check(
    authed_controller_client: aiohttp.ClientSession, http_reviewer: InProcessReviewer
) -> None:
    async with authed_controller_client.post("/snapshot") as resp:
        assert resp.status == 401
    read = {"Authorization": "Bearer read-token"}
    async with authed_controller_client.delete("/snapshot", headers=read) as resp:
        assert (resp.status, resp.headers["Allow"]) == (405, "GET")
    async with authed_controller_client.get("/snapshot", headers=read) as resp:
        assert resp.status == 200
    assert http_reviewer.calls == 1  # the second request was a cache hit


# -- controller: /templates ---------------------------------------------------------

TEMPLATE_SPEC = {
    "body": "You are {{.persona}}. Question: {{.question}}",
    "slots": [
        {"name": "persona", "type": "Stable", "required": True},
        {"name": "question", "type": "Mutable"},
    ],
}


def _templates_body(*refs: str, spec: dict[str, object] = TEMPLATE_SPEC) -> bytes:
    return templates.encode([templates.build(*ref.split("/"), spec) for ref in refs])


@pytest.fixture()
def http_template_store() -> templates.TemplateStore:
    return templates.TemplateStore()


@pytest.fixture()
async def templates_client(
    http_template_store: templates.TemplateStore, http_reviewer: InProcessReviewer
) -> AsyncIterator[aiohttp.ClientSession]:
    app = ic_http.build_controller_app(
        snapshot_json=lambda: SNAPSHOT_BODY,
        policies=PolicyStore(),
        snapshot_auth=None,
        policy_auth=None,
        templates=http_template_store,
        templates_auth=auth.Authenticator(http_reviewer, expected_sa=CONTROLLER_SA, audience=WRITE_AUDIENCE),
    )
    async for client in _serve(app):
        yield client


WRITE = {"Authorization": "Bearer write-token"}


async def test_templates_put_replaces_the_store(
    templates_client: aiohttp.ClientSession, http_template_store: templates.TemplateStore
) -> None:
    async with templates_client.put(
        "/templates", headers=WRITE, data=_templates_body("a/one", "a/two")
    ) as resp:
        assert (resp.status, await resp.read()) == (204, b"")
    assert http_template_store.lookup("a/one", "a") is not None
    async with templates_client.put("/templates", headers=WRITE, data=_templates_body("b/three")) as resp:
        assert resp.status == 204
    assert len(http_template_store) == 1
    assert http_template_store.lookup("a/one", "a") is None
    assert http_template_store.lookup("b/three", "b") is not None


async def test_templates_needs_the_controller_token_and_put(
    templates_client: aiohttp.ClientSession, http_template_store: templates.TemplateStore
) -> None:
    body = _templates_body("a/one")
    async with templates_client.put("/templates", data=body) as resp:
        assert resp.status == 401
    async with templates_client.put(
        "/templates", headers={"Authorization": "Bearer read-token"}, data=body
    ) as resp:
        assert resp.status == 401  # another audience
    for method in ("GET", "POST", "DELETE"):
        async with templates_client.request(method, "/templates", headers=WRITE, data=body) as resp:
            assert (resp.status, resp.headers["Allow"]) == (405, "PUT"), method
    assert len(http_template_store) == 0


async def test_templates_not_served_without_a_store(open_controller_client: aiohttp.ClientSession) -> None:
    async with open_controller_client.put("/templates", data=_templates_body("a/one")) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{", "decode templates: not valid JSON", id="json"),
        pytest.param(b'{"version": 2, "templates": []}', "unsupported templates version 2", id="version"),
        pytest.param(b'{"version": 1, "templates": [], "x": 1}', "unknown field 'x'", id="unknown-field"),
        pytest.param(
            b'{"version": 1, "version": 1, "templates": []}', "duplicate field 'version'", id="duplicate-key"
        ),
        pytest.param(
            b'{"version": 1, "templates": [{"namespace": "a", "name": "x", "spec": {}}]}',
            "templates[0].revision: required field is missing",
            id="missing-revision",
        ),
        pytest.param(
            b'{"version": 1, "templates": [{"namespace": "a", "name": "x", "revision": "r",'
            b' "spec": {"body": "{{.q}}", "slots": []}}]}',
            "templates[0].spec.body (line 1, column 1): slot 'q' is not declared in spec.slots",
            id="spec-error",
        ),
        pytest.param(
            _templates_body("a/one").replace(b'"revision": "', b'"revision": "0'),
            "templates[0].revision: ",
            id="wrong-revision",
        ),
        pytest.param(
            _templates_body("a/one", "a/one"), "templates[1]: a/one is already templates[0]", id="dup"
        ),
        pytest.param(
            _templates_body("a/one").replace(b'"namespace": "a"', b'"namespace": "A"'),
            "templates[0].namespace: 'A' is not a namespace name",
            id="ns",
        ),
    ],
)
async def test_templates_bad_bodies_are_400_and_leave_the_store(
    templates_client: aiohttp.ClientSession,
    http_template_store: templates.TemplateStore,
    body: bytes,
    message: str,
) -> None:
    http_template_store.replace([templates.build("keep", "me", TEMPLATE_SPEC)])
    async with templates_client.put("/templates", headers=WRITE, data=body) as resp:
        text = await resp.text()
        assert resp.status == 400, text
        assert text.startswith("decode templates: ") and message in text, text
    assert http_template_store.lookup("keep/me", "keep") is not None


async def test_templates_body_over_1_mib_is_400(
    templates_client: aiohttp.ClientSession, http_template_store: templates.TemplateStore
) -> None:
    spec = {
        **TEMPLATE_SPEC,
        "slots": [{**TEMPLATE_SPEC["slots"][0], "description": "x" * (1 << 20)}, TEMPLATE_SPEC["slots"][1]],
    }  # type: ignore[index, dict-item]
    async with templates_client.put(
        "/templates", headers=WRITE, data=io.BytesIO(_templates_body("a/one", spec=spec))
    ) as resp:
        assert (resp.status, await resp.text()) == (400, "decode templates: request body too large\n")
    assert len(http_template_store) == 0
