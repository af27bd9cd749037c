"""``extproc.auth``: bearer parsing, the TokenReview client, the cached authenticator, and
the startup flag rules.

The API server is a real HTTP server on 127.0.0.1 (``tokenreview_apiserver``: kmock, as
kopf's own tests use) that answers ``POST /apis/authentication.k8s.io/v1/tokenreviews``
like kube-apiserver's ServiceAccount authenticator: it knows a few tokens, each minted
for one identity and a set of audiences, and rejects a review whose ``spec.audiences``
the token was not minted for, with the apiserver's diagnostic. Anything else (e.g. a
wrong credential of our own) answers 500. The authenticator talks to it through the
production ``KubeTokenReviewer``. Time is an injected clock; nothing sleeps.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest

from inference_cache.extproc import auth

CONTROLLER_SA = "system:serviceaccount:inference-cache-system:inference-cache-controller-manager"
OTHER_SA = "system:serviceaccount:default:someone-else"
#: The bearer the server itself presents to the API server.
API_TOKEN = "server-sa-token"


@dataclass(frozen=True)
class MintedToken:
    username: str
    audiences: tuple[str, ...]


#: Another audience of ours (the original's later write-side one): the read side refuses it.
OTHER_AUDIENCE = "inferencecache.io/policy"

#: token -> identity it was minted for.
TOKENS = {
    "controller-token": MintedToken(CONTROLLER_SA, (auth.CONTROLLER_AUDIENCE,)),
    "controller-token-2": MintedToken(CONTROLLER_SA, (auth.CONTROLLER_AUDIENCE,)),
    "policy-token": MintedToken(CONTROLLER_SA, (OTHER_AUDIENCE,)),
    "default-audience-token": MintedToken(CONTROLLER_SA, ("https://kubernetes.default.svc",)),
    "other-sa-token": MintedToken(OTHER_SA, (auth.CONTROLLER_AUDIENCE,)),
}


def _review(request: kmock.Request) -> dict[str, Any]:
    spec = request.data["spec"]
    status: dict[str, Any]
    minted = TOKENS.get(spec["token"])
    wanted = spec.get("audiences", [])
    if minted is None:
        status = {
            "authenticated": False,
            "error": "[invalid bearer token, square/go-jose: compact JWS format]",
        }
    elif wanted and not set(wanted) & set(minted.audiences):
        status = {
            "authenticated": False,
            "error": f"[invalid bearer token, token audiences {list(minted.audiences)} is invalid "
            f"for the target audiences {wanted}]",
        }
    else:
        status = {
            "authenticated": True,
            "user": {"username": minted.username, "uid": "u-1", "groups": ["system:serviceaccounts"]},
            "audiences": wanted or list(minted.audiences),
        }
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}


@dataclass
class TokenReviewApiserver:
    handler: kmock.RawHandler
    server: kmock.Server

    @property
    def config(self) -> auth.KubeAPIConfig:
        return auth.KubeAPIConfig(base_url=str(self.server.url), token=API_TOKEN)

    @property
    def reviews(self) -> list[kmock.Request]:
        return list(self.handler[f"post {auth.TOKENREVIEW_PATH}"])


@pytest.fixture()
async def tokenreview_apiserver() -> AsyncIterator[TokenReviewApiserver]:
    async with kmock.RawHandler() as handler, kmock.Server(handler) as server:
        (
            handler[f"post {auth.TOKENREVIEW_PATH}", kmock.headers(Authorization=f"Bearer {API_TOKEN}")]
            << _review
        )
        handler.fallback << 500 << b'{"kind":"Status","status":"Failure","code":500}'
        yield TokenReviewApiserver(handler, server)


@pytest.fixture()
async def tokenreviewer(tokenreview_apiserver: TokenReviewApiserver) -> AsyncIterator[auth.KubeTokenReviewer]:
    async with auth.KubeTokenReviewer(tokenreview_apiserver.config) as reviewer:
        yield reviewer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def auth_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def auth_results() -> list[str]:
    return []


@pytest.fixture()
def authenticator(
    tokenreviewer: auth.KubeTokenReviewer, auth_clock: FakeClock, auth_results: list[str]
) -> auth.Authenticator:
    return auth.Authenticator(
        tokenreviewer,
        expected_sa=CONTROLLER_SA,
        audience=auth.CONTROLLER_AUDIENCE,
        on_result=auth_results.append,
        clock=auth_clock,
    )


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Basic abc", None),
        ("Bearerabc", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc  ", "abc"),
        ("Bearer a b", "a b"),
    ],
)
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert auth.parse_bearer(header) == token


@pytest.mark.parametrize("header", [None, "", "Basic Y29udHJvbGxlcg==", "Bearer ", "Token controller-token"])
async def test_missing_or_malformed_header_is_unauth_without_review(
    authenticator: auth.Authenticator,
    tokenreview_apiserver: TokenReviewApiserver,
    auth_results: list[str],
    header: str | None,
) -> None:
    assert await authenticator.authenticate(header) is auth.AuthResult.UNAUTH
    assert auth_results == ["unauth"]
    assert tokenreview_apiserver.reviews == []


async def test_valid_controller_token_is_ok_and_review_is_well_formed(
    authenticator: auth.Authenticator, tokenreview_apiserver: TokenReviewApiserver, auth_results: list[str]
) -> None:
    assert await authenticator.authenticate("Bearer controller-token") is auth.AuthResult.OK
    assert auth_results == ["ok"]
    (review,) = tokenreview_apiserver.reviews
    assert review.headers["Authorization"] == f"Bearer {API_TOKEN}"
    assert review.data == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": "controller-token", "audiences": [auth.CONTROLLER_AUDIENCE]},
    }


async def test_wrong_service_account_is_forbidden_and_not_cached(
    authenticator: auth.Authenticator, tokenreview_apiserver: TokenReviewApiserver, auth_results: list[str]
) -> None:
    assert await authenticator.authenticate("Bearer other-sa-token") is auth.AuthResult.FORBIDDEN
    assert await authenticator.authenticate("Bearer other-sa-token") is auth.AuthResult.FORBIDDEN
    assert auth_results == ["forbidden", "forbidden"]
    assert len(tokenreview_apiserver.reviews) == 2
    assert authenticator.cached_entries == 0


@pytest.mark.parametrize(
    ("token", "diagnostic"),
    [
        pytest.param("default-audience-token", "is invalid for the target audiences", id="wrong-audience"),
        pytest.param(
            "policy-token", "is invalid for the target audiences", id="policy-audience-on-read-side"
        ),
        pytest.param("not-a-real-token", "invalid bearer token", id="unknown-token"),
    ],
)
async def test_unauthenticated_review_is_unauth_and_logged(
    authenticator: auth.Authenticator,
    auth_results: list[str],
    caplog: pytest.LogCaptureFixture,
    token: str,
    diagnostic: str,
) -> None:
    with caplog.at_level(logging.WARNING, logger=auth.__name__):
        assert await authenticator.authenticate(f"Bearer {token}") is auth.AuthResult.UNAUTH
    assert auth_results == ["unauth"]
    (record,) = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.WARNING, "auth_token_review_unauthenticated")
    assert diagnostic in record.error  # type: ignore[attr-defined]
    assert authenticator.cached_entries == 0


async def test_empty_audience_omits_audiences_from_the_review(
    tokenreviewer: auth.KubeTokenReviewer, tokenreview_apiserver: TokenReviewApiserver
) -> None:
    authn = auth.Authenticator(tokenreviewer, expected_sa=CONTROLLER_SA, audience="")
    assert await authn.authenticate("Bearer default-audience-token") is auth.AuthResult.OK
    (review,) = tokenreview_apiserver.reviews
    assert review.data["spec"] == {"token": "default-audience-token"}


async def test_api_error_is_error(
    tokenreview_apiserver: TokenReviewApiserver, auth_results: list[str], auth_clock: FakeClock
) -> None:
    # The API server refuses our own credentials (e.g. RBAC, rotated token): 5xx from the fallback.
    config = auth.KubeAPIConfig(base_url=str(tokenreview_apiserver.server.url), token="stale")
    async with auth.KubeTokenReviewer(config) as reviewer:
        authn = auth.Authenticator(
            reviewer,
            expected_sa=CONTROLLER_SA,
            audience=auth.CONTROLLER_AUDIENCE,
            on_result=auth_results.append,
        )
        assert await authn.authenticate("Bearer controller-token") is auth.AuthResult.ERROR
    assert auth_results == ["error"]
    (review,) = tokenreview_apiserver.reviews
    assert review.headers["Authorization"] == "Bearer stale"


async def test_unreachable_api_is_error(auth_results: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with auth.KubeTokenReviewer(auth.KubeAPIConfig(base_url=f"http://127.0.0.1:{port}")) as reviewer:
        authn = auth.Authenticator(
            reviewer,
            expected_sa=CONTROLLER_SA,
            audience=auth.CONTROLLER_AUDIENCE,
            on_result=auth_results.append,
        )
        assert await authn.authenticate("Bearer controller-token") is auth.AuthResult.ERROR
    assert auth_results == ["error"]


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="not-object"),
        pytest.param(b'{"status": "yes"}', id="status-string"),
    ],
)
async def test_unreadable_reply_is_error(
    tokenreview_apiserver: TokenReviewApiserver, tokenreviewer: auth.KubeTokenReviewer, reply: bytes
) -> None:
    tokenreview_apiserver.handler[f"post {auth.TOKENREVIEW_PATH}"].override << 201 << reply
    with pytest.raises(auth.TokenReviewError):
        await tokenreviewer.review("controller-token", [auth.CONTROLLER_AUDIENCE])


async def test_reply_without_status_is_unauthenticated(
    tokenreview_apiserver: TokenReviewApiserver, tokenreviewer: auth.KubeTokenReviewer
) -> None:
    tokenreview_apiserver.handler[f"post {auth.TOKENREVIEW_PATH}"].override << 201 << {"kind": "TokenReview"}
    assert await tokenreviewer.review("controller-token", []) == auth.TokenReviewStatus(authenticated=False)


async def test_cache_hit_avoids_a_second_review_until_expiry(
    authenticator: auth.Authenticator,
    tokenreview_apiserver: TokenReviewApiserver,
    auth_clock: FakeClock,
    auth_results: list[str],
) -> None:
    assert await authenticator.authenticate("Bearer controller-token") is auth.AuthResult.OK
    auth_clock.now += 29.9
    assert await authenticator.authenticate("bearer controller-token ") is auth.AuthResult.OK
    assert len(tokenreview_apiserver.reviews) == 1
    auth_clock.now += 0.1  # exactly 30 s after the review: expired
    assert await authenticator.authenticate("Bearer controller-token") is auth.AuthResult.OK
    assert len(tokenreview_apiserver.reviews) == 2
    assert auth_results == ["ok", "ok", "ok"]


async def test_cache_is_capped_evicting_expired_then_soonest_expiring(
    tokenreview_apiserver: TokenReviewApiserver, tokenreviewer: auth.KubeTokenReviewer, auth_clock: FakeClock
) -> None:
    # Every token authenticates as the controller, so 40 distinct tokens fill the cache.
    tokenreview_apiserver.handler[f"post {auth.TOKENREVIEW_PATH}"].override << (
        lambda request: {"status": {"authenticated": True, "user": {"username": CONTROLLER_SA}}}
    )
    authn = auth.Authenticator(
        tokenreviewer, expected_sa=CONTROLLER_SA, audience=auth.CONTROLLER_AUDIENCE, clock=auth_clock
    )
    for i in range(32):
        assert await authn.authenticate(f"Bearer t{i}") is auth.AuthResult.OK
        auth_clock.now += 0.5
    assert authn.cached_entries == 32
    assert len(tokenreview_apiserver.reviews) == 32

    # Full: the soonest-expiring entry (t0) makes room for t32; t1 is still cached.
    assert await authn.authenticate("Bearer t32") is auth.AuthResult.OK
    assert authn.cached_entries == 32
    await authn.authenticate("Bearer t1")
    assert len(tokenreview_apiserver.reviews) == 33
    await authn.authenticate("Bearer t0")
    assert len(tokenreview_apiserver.reviews) == 34  # t0 was evicted (and t1 made room for it)

    # Once entries expire, a put prunes all expired ones first: at +35.5 s, t2..t11 are gone.
    auth_clock.now = 1000.0 + 35.5
    await authn.authenticate("Bearer fresh")
    assert authn.cached_entries == 32 - 10 + 1


def test_in_cluster_config(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "ca.crt").write_text("ca")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert auth.in_cluster_config(env, sa_dir=tmp_path) == auth.KubeAPIConfig(
        base_url="https://10.0.0.1:443", token_file=tmp_path / "token", ca_file=tmp_path / "ca.crt"
    )
    v6 = auth.in_cluster_config({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}, sa_dir=tmp_path)
    assert v6.base_url == "https://[fd00::1]:443"
    with pytest.raises(auth.InClusterConfigError, match="KUBERNETES_SERVICE_HOST"):
        auth.in_cluster_config({}, sa_dir=tmp_path)
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(auth.InClusterConfigError, match=r"ca\.crt is missing"):
        auth.in_cluster_config(env, sa_dir=tmp_path)


async def test_token_file_is_reread_for_every_review(
    tokenreview_apiserver: TokenReviewApiserver, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("rotated-away\n")
    config = auth.KubeAPIConfig(base_url=str(tokenreview_apiserver.server.url), token_file=token_file)
    async with auth.KubeTokenReviewer(config) as reviewer:
        with pytest.raises(auth.TokenReviewError, match="HTTP 500"):
            await reviewer.review("controller-token", [])
        token_file.write_text(f"{API_TOKEN}\n")
        status = await reviewer.review("controller-token", [])
    assert status == auth.TokenReviewStatus(authenticated=True, username=CONTROLLER_SA)


def test_authenticator_requires_an_expected_sa(tokenreviewer: auth.KubeTokenReviewer) -> None:
    with pytest.raises(ValueError, match="expected_sa"):
        auth.Authenticator(tokenreviewer, expected_sa="", audience=auth.CONTROLLER_AUDIENCE)


SA = CONTROLLER_SA
AUD = auth.CONTROLLER_AUDIENCE
SA_WS = "--allowed-controller-sa has leading/trailing"
AUD_EMPTY = "--controller-audience cannot be empty"
AUD_WS = "--controller-audience has leading/trailing"


@pytest.mark.parametrize(
    ("sa", "insecure", "audience", "error"),
    [
        pytest.param(SA, False, AUD, None, id="sa"),
        pytest.param("", True, AUD, None, id="insecure"),
        pytest.param("", True, "", None, id="insecure-ignores-audience"),
        pytest.param(SA, True, AUD, "mutually exclusive", id="both"),
        pytest.param("", False, AUD, "missing --allowed-controller-sa", id="neither"),
        pytest.param(f" {SA}", False, AUD, SA_WS, id="sa-space"),
        pytest.param(f"{SA}\n", False, AUD, SA_WS, id="sa-newline"),
        pytest.param(SA, False, "", AUD_EMPTY, id="audience-empty"),
        pytest.param(SA, False, "  ", AUD_EMPTY, id="audience-blank"),
        pytest.param(SA, False, f"{AUD} ", AUD_WS, id="audience-space"),
        pytest.param(SA, False, f"\t{AUD}", AUD_WS, id="audience-tab"),
    ],
)
def test_validate_controller_auth_flags(sa: str, insecure: bool, audience: str, error: str | None) -> None:
    message = auth.validate_controller_auth_flags(
        allowed_controller_sa=sa,
        insecure_disable_auth=insecure,
        controller_audience=audience,
    )
    if error is None:
        assert message is None
    else:
        assert message is not None
        assert error in message
