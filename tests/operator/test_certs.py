"""operator/certs.py: the self-signed webhook CA and serving certificate (verified as a
TLS client verifies them, with cryptography's X.509 path validation), the files kopf
loads, the caBundle kept across a rolling update, and the CA written into both webhook
configurations through kmock, retried until they exist."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from kubernetes import client as k8s

from inference_cache.operator import certs, kube

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
NAMES = certs.service_dns_names("inference-cache-webhook", "inference-cache-system")

MUTATING = kmock.resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
VALIDATING = kmock.resource("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations")


@pytest.fixture(scope="module")
def issued() -> certs.WebhookCertificate:
    return certs.generate(NAMES, now=NOW)


def verify(issued: certs.WebhookCertificate, name: str, at: dt.datetime) -> None:
    store = verification.Store([x509.load_pem_x509_certificate(issued.ca_pem)])
    verifier = verification.PolicyBuilder().store(store).time(at).build_server_verifier(x509.DNSName(name))
    verifier.verify(x509.load_pem_x509_certificate(issued.cert_pem), [])


def test_dns_names_of_the_service() -> None:
    assert NAMES == (
        "inference-cache-webhook.inference-cache-system.svc",
        "inference-cache-webhook.inference-cache-system.svc.cluster.local",
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_serving_certificate_verifies_against_the_ca(issued: certs.WebhookCertificate, name: str) -> None:
    verify(issued, name, NOW)
    verify(issued, name, NOW + certs.VALIDITY - dt.timedelta(seconds=1))


@pytest.mark.parametrize(
    ("name", "at"),
    [
        ("inference-cache-webhook.default.svc", NOW),
        (NAMES[0], NOW + certs.VALIDITY + dt.timedelta(seconds=1)),
        (NAMES[0], NOW - dt.timedelta(hours=2)),
    ],
)
def test_another_name_or_time_does_not_verify(
    issued: certs.WebhookCertificate, name: str, at: dt.datetime
) -> None:
    with pytest.raises(verification.VerificationError):
        verify(issued, name, at)


def test_another_ca_does_not_verify(issued: certs.WebhookCertificate) -> None:
    other = certs.generate(NAMES, now=NOW)
    with pytest.raises(verification.VerificationError):
        verify(certs.WebhookCertificate(other.ca_pem, issued.cert_pem, issued.key_pem), NAMES[0], NOW)


def test_certificate_contents(issued: certs.WebhookCertificate) -> None:
    ca = x509.load_pem_x509_certificate(issued.ca_pem)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert key.public_key() == cert.public_key()
    assert key.public_key() != ca.public_key()
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == list(NAMES)
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == NAMES[0]
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.not_valid_before_utc == cert.not_valid_before_utc == NOW - dt.timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW + certs.VALIDITY


def test_generate_needs_a_name() -> None:
    with pytest.raises(ValueError, match="DNS name"):
        certs.generate([], now=NOW)


def test_files_load_into_an_ssl_context(issued: certs.WebhookCertificate, tmp_path: Path) -> None:
    files = certs.write_files(issued, tmp_path)
    assert files.cafile is not None
    assert files.cafile.read_bytes() == issued.ca_pem
    assert files.certfile.read_bytes() == issued.cert_pem
    assert stat.S_IMODE(files.pkeyfile.stat().st_mode) == 0o600
    context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.certfile, files.pkeyfile)  # raises when the key does not match


# -- the caBundle -----------------------------------------------------------------------


def b64(pem: bytes) -> str:
    return base64.b64encode(pem).decode("ascii")


@pytest.fixture(scope="module")
def previous() -> certs.WebhookCertificate:
    return certs.generate(NAMES, now=NOW - dt.timedelta(days=1))


@pytest.mark.parametrize("current", [None, "", "not base64!", b64(b"no certificate here")])
def test_bundle_is_our_ca_without_a_usable_current_one(
    issued: certs.WebhookCertificate, current: str | None
) -> None:
    assert certs.ca_bundle(issued.ca_pem, current, now=NOW) == issued.ca_pem


def test_bundle_keeps_the_previous_ca_only(
    issued: certs.WebhookCertificate, previous: certs.WebhookCertificate
) -> None:
    older = certs.generate(NAMES, now=NOW - dt.timedelta(days=2))
    bundle = certs.ca_bundle(issued.ca_pem, b64(previous.ca_pem + older.ca_pem), now=NOW)
    assert bundle == issued.ca_pem + previous.ca_pem
    # The previous pod's certificate still verifies against the bundle written.
    for pem in (issued, previous):
        store = verification.Store(x509.load_pem_x509_certificates(bundle))
        verifier = (
            verification.PolicyBuilder().store(store).time(NOW).build_server_verifier(x509.DNSName(NAMES[0]))
        )
        verifier.verify(x509.load_pem_x509_certificate(pem.cert_pem), [])


def test_bundle_drops_an_expired_previous_ca_and_our_own(
    issued: certs.WebhookCertificate, previous: certs.WebhookCertificate
) -> None:
    assert certs.ca_bundle(issued.ca_pem, b64(previous.ca_pem), now=NOW + certs.VALIDITY) == issued.ca_pem
    assert certs.ca_bundle(issued.ca_pem, b64(issued.ca_pem), now=NOW) == issued.ca_pem


def test_patch_sets_the_bundle_of_every_webhook(
    issued: certs.WebhookCertificate, previous: certs.WebhookCertificate
) -> None:
    live = {
        "webhooks": [
            {"name": "a.inferencecache.io", "clientConfig": {"service": {"name": "s"}}},
            {"name": "b.inferencecache.io", "clientConfig": {"caBundle": b64(previous.ca_pem)}},
        ]
    }
    assert certs.ca_bundle_patch(live, issued.ca_pem, now=NOW) == {
        "webhooks": [
            {"name": "a.inferencecache.io", "clientConfig": {"caBundle": b64(issued.ca_pem)}},
            {
                "name": "b.inferencecache.io",
                "clientConfig": {"caBundle": b64(issued.ca_pem + previous.ca_pem)},
            },
        ]
    }


# -- writing it through the API -----------------------------------------------------------


@pytest.fixture
def k(kmock: kmock.KubernetesEmulator) -> Iterator[kube.Kube]:
    config = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    config.retries = 0
    with k8s.ApiClient(config) as api:
        yield kube.Kube(api, timeout_s=10)


def configuration(kind: str, name: str, webhooks: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "webhooks": [
            {"name": w, "clientConfig": {"service": {"name": "inference-cache-webhook"}}} for w in webhooks
        ],
    }


def install_configurations(kmock: kmock.KubernetesEmulator) -> None:
    kmock.objects[MUTATING, None, "inference-cache-mutating-webhook"] = configuration(
        "MutatingWebhookConfiguration",
        "inference-cache-mutating-webhook",
        ["mpod.inferencecache.io", "mcachebackend.inferencecache.io"],
    )
    kmock.objects[VALIDATING, None, "inference-cache-validating-webhook"] = configuration(
        "ValidatingWebhookConfiguration",
        "inference-cache-validating-webhook",
        ["vcachebackend.inferencecache.io"],
    )


def ca_patches(kmock: kmock.KubernetesEmulator) -> dict[str, Any]:
    """The patches seen, by configuration name (each must be a strategic merge patch)."""
    out = {}
    for req in kmock["patch"]:
        assert req.headers["Content-Type"] == "application/strategic-merge-patch+json"
        out[req.url.path.rsplit("/", 1)[1]] = req.data
    return out


def expected_patches(ca_pem: bytes) -> dict[str, Any]:
    def patch(*webhooks: str) -> dict[str, Any]:
        return {"webhooks": [{"name": w, "clientConfig": {"caBundle": b64(ca_pem)}} for w in webhooks]}

    return {
        "inference-cache-mutating-webhook": patch(
            "mpod.inferencecache.io", "mcachebackend.inferencecache.io"
        ),
        "inference-cache-validating-webhook": patch("vcachebackend.inferencecache.io"),
    }


async def test_inject_writes_the_ca_into_both_configurations(
    kmock: kmock.KubernetesEmulator, k: kube.Kube, issued: certs.WebhookCertificate
) -> None:
    install_configurations(kmock)
    await asyncio.wait_for(certs.inject_ca(k, issued.ca_pem, clock=lambda: NOW), timeout=20)
    assert ca_patches(kmock) == expected_patches(issued.ca_pem)
    assert [r.url.path for r in kmock["patch"]] == [
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/inference-cache-mutating-webhook",
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/inference-cache-validating-webhook",
    ]


async def test_inject_retries_until_the_configurations_exist(
    kmock: kmock.KubernetesEmulator,
    k: kube.Kube,
    issued: certs.WebhookCertificate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = asyncio.create_task(certs.inject_ca(k, issued.ca_pem, clock=lambda: NOW, first_retry_s=0.01))
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while len(kmock["get"]) < 4:  # two rounds of both configurations not found
            assert not task.done() and loop.time() < end
            await asyncio.sleep(0.01)
        assert len(kmock["patch"]) == 0
        install_configurations(kmock)
        await asyncio.wait_for(task, timeout=20)
    finally:
        task.cancel()
    assert ca_patches(kmock) == expected_patches(issued.ca_pem)
    assert "MutatingWebhookConfiguration inference-cache-mutating-webhook not found" in caplog.text
