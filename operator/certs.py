"""The operator's own webhook certificate, for installs without cert-manager (issue #7).

Owner: ``inference-cache operator``. Place in the flow: when the operator is started with
webhooks but without ``--webhook-tls-cert-file``/``--webhook-tls-key-file`` (the default
install, ``config/default``), ``operator.main`` calls :func:`generate` once at startup: a
new self-signed CA and a serving certificate for the webhook Service's DNS names, signed
by it. :func:`write_files` puts them in a private temporary directory for kopf's
``WebhookServer`` (Python's ``ssl`` loads certificates from files only), and
:func:`inject_ca` writes the CA into ``caBundle`` of every webhook of the two webhook
configurations of ``config/webhook`` (retrying until the API accepts it; never fatal). With
the cert-manager overlay none of this runs: cert-manager issues the certificate and its CA
injector fills ``caBundle``.

The bundle written keeps the previous CA (the first certificate of the current bundle,
while it is valid) after ours: during a rolling update the old operator pod keeps serving
with its certificate until the new one is ready. The bundle therefore never holds more
than two CAs. Keys are ECDSA P-256; nothing is rotated while the process runs (the
certificates are valid for :data:`VALIDITY`, a restart makes new ones).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from inference_cache.operator.kube import Kube, KubeError

ADMISSION_API_VERSION: Final = "admissionregistration.k8s.io/v1"
#: ``(kind, name)`` of the webhook configurations in ``config/webhook/manifests.yaml``; the
#: operator's RBAC allows ``get``/``patch`` on these two objects only.
WEBHOOK_CONFIGURATIONS: Final = (
    ("MutatingWebhookConfiguration", "inference-cache-mutating-webhook"),
    ("ValidatingWebhookConfiguration", "inference-cache-validating-webhook"),
)
VALIDITY: Final = dt.timedelta(days=3650)
#: ``notBefore`` is set this far in the past: the apiserver's clock may be behind ours.
_BACKDATE: Final = dt.timedelta(hours=1)
CA_COMMON_NAME: Final = "inference-cache-operator webhook CA"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WebhookCertificate:
    """PEM bytes: the CA certificate, the serving certificate it signed, the serving key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where the certificate files are, for kopf's ``WebhookServer`` (``cafile`` is
    ``None`` for mounted cert-manager files: their CA is injected by cert-manager)."""

    certfile: Path
    pkeyfile: Path
    cafile: Path | None = None


def service_dns_names(service: str, namespace: str) -> tuple[str, ...]:
    """The names the apiserver may use for a webhook ``clientConfig.service``."""
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")


def _key_id(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def generate(
    dns_names: Sequence[str], *, now: dt.datetime, validity: dt.timedelta = VALIDITY
) -> WebhookCertificate:
    """A new CA (``CA:TRUE``, path length 0, signs certificates only) and a serving
    certificate for ``dns_names`` (the first is its common name) signed by it."""
    if not dns_names:
        raise ValueError("a serving certificate needs at least one DNS name")
    not_before, not_after = now - _BACKDATE, now + validity
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_key_id(ca_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(_key_id(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_key_id(ca_key)), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return WebhookCertificate(
        ca_pem=ca.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def write_files(certificate: WebhookCertificate, directory: Path) -> CertFiles:
    """``ca.crt``, ``tls.crt`` and ``tls.key`` (mode 0600) in ``directory``."""
    ca, cert, key = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    ca.write_bytes(certificate.ca_pem)
    cert.write_bytes(certificate.cert_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(certificate.key_pem)
    return CertFiles(certfile=cert, pkeyfile=key, cafile=ca)


def ca_bundle(ca_pem: bytes, current: str | None, *, now: dt.datetime) -> bytes:
    """The PEM bundle to write: our CA, then the first CA of ``current`` (the base64
    ``caBundle`` found) if it is another certificate still valid at ``now``."""
    if not current:
        return ca_pem
    try:
        previous = x509.load_pem_x509_certificates(base64.b64decode(current, validate=True))[0]
    except ValueError:  # not base64 (binascii.Error), or no PEM certificate in it
        return ca_pem
    ours = x509.load_pem_x509_certificate(ca_pem)
    if previous == ours or not previous.not_valid_before_utc <= now < previous.not_valid_after_utc:
        return ca_pem
    return ca_pem + previous.public_bytes(serialization.Encoding.PEM)


def ca_bundle_patch(live: Mapping[str, Any], ca_pem: bytes, *, now: dt.datetime) -> dict[str, Any]:
    """A strategic merge patch (``webhooks`` merge by ``name``) setting
    ``clientConfig.caBundle`` of every webhook of the live configuration ``live``."""
    return {
        "webhooks": [
            {
                "name": w["name"],
                "clientConfig": {
                    "caBundle": base64.b64encode(
                        ca_bundle(ca_pem, (w.get("clientConfig") or {}).get("caBundle"), now=now)
                    ).decode("ascii")
                },
            }
            for w in live.get("webhooks") or []
        ]
    }


def inject_one(kube: Kube, kind: str, name: str, ca_pem: bytes, *, now: dt.datetime) -> bool:
    """Write the CA into one configuration; ``False`` (logged) when that failed."""
    try:
        live = kube.get(ADMISSION_API_VERSION, kind, None, name)
        if live is None:
            log.warning("%s %s not found: its webhooks have no CA yet", kind, name)
            return False
        kube.patch(
            ADMISSION_API_VERSION,
            kind,
            None,
            name,
            ca_bundle_patch(live, ca_pem, now=now),
            patch_type="strategic",
        )
    except KubeError as e:
        log.warning("cannot write the webhook CA into %s %s: %s", kind, name, e)
        return False
    log.info("webhook CA written into %s %s", kind, name)
    return True


async def inject_ca(
    kube: Kube,
    ca_pem: bytes,
    *,
    clock: Callable[[], dt.datetime],
    first_retry_s: float = 1.0,
    max_retry_s: float = 60.0,
) -> None:
    """Write the CA into both configurations of :data:`WEBHOOK_CONFIGURATIONS`, retrying
    the failed ones with a doubling delay (up to ``max_retry_s``) until both succeed."""
    pending = list(WEBHOOK_CONFIGURATIONS)
    delay = first_retry_s
    while True:
        done = [
            await asyncio.to_thread(inject_one, kube, kind, name, ca_pem, now=clock())
            for kind, name in pending
        ]
        pending = [config for config, ok in zip(pending, done, strict=True) if not ok]
        if not pending:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_retry_s)
