"""Server-side TLS for the gRPC listener, with certificate rotation without restart.

Owner: ``inference_cache.extproc``. The composition root (``extproc.serve``) calls
:func:`load_grpc_server_credentials` with ``--tls-cert-file`` / ``--tls-key-file`` and passes
the result to ``server.add_secure_port`` (or serves plaintext on ``None``). HTTP listeners
stay plaintext; mTLS is out of scope (the original's ``pkg/server/tls.go``,
``docs/design/grpc-tls.md``).

* both paths empty -> ``None`` (plaintext, the default install);
* exactly one -> :class:`PartialTLSConfigError` (the caller exits 2);
* both -> the keypair is loaded and checked now (:class:`TLSLoadError`, the caller exits 1),
  then served through ``grpc.dynamic_ssl_server_credentials``: gRPC asks the fetcher at
  every handshake, the fetcher ``stat``s the certificate and reloads the pair when its mtime
  has advanced (cert-manager rewrites the Secret, kubelet swaps the files). A reload that
  fails (torn write, mismatched pair) is logged as ``grpc_tls_reload`` and the last good
  pair keeps being served; the next handshake retries.

gRPC core enforces TLS 1.2 as the minimum version, as the original configures.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)


class PartialTLSConfigError(ValueError):
    """Exactly one of the certificate and key files was given."""

    def __init__(self) -> None:
        super().__init__("--tls-cert-file and --tls-key-file must both be set or both be empty")


class TLSLoadError(Exception):
    """The keypair cannot be read, parsed, or does not match."""


def _read_pair(cert_file: Path, key_file: Path) -> tuple[int, bytes, bytes]:
    """``(cert mtime_ns, cert PEM, key PEM)``, checked to parse and match."""
    try:
        mtime_ns = cert_file.stat().st_mtime_ns
        cert, key = cert_file.read_bytes(), key_file.read_bytes()
        # The ssl module validates the PEMs and that the key belongs to the certificate.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
        # Reject a pair that changed while we looked at it (a rotation in progress).
        if (cert_file.read_bytes(), key_file.read_bytes()) != (cert, key):
            raise TLSLoadError("keypair changed while loading")
    except (OSError, ssl.SSLError) as e:
        raise TLSLoadError(f"load keypair (cert={cert_file}, key={key_file}): {e}") from e
    return mtime_ns, cert, key


class ReloadingKeypair:
    """The certificate-configuration fetcher behind the dynamic gRPC credentials."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._cert_file, self._key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._mtime_ns, cert, key = _read_pair(cert_file, key_file)
        self.initial = grpc.ssl_server_certificate_configuration([(key, cert)])

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration, or ``None`` for no change."""
        try:
            mtime_ns = self._cert_file.stat().st_mtime_ns
        except OSError:
            return None
        with self._lock:
            if mtime_ns <= self._mtime_ns:
                return None
            try:
                self._mtime_ns, cert, key = _read_pair(self._cert_file, self._key_file)
            except TLSLoadError as e:
                logger.error("grpc_tls_reload", extra={"err": str(e), "cert_file": str(self._cert_file)})
                return None
        logger.info("grpc_tls_reloaded", extra={"cert_file": str(self._cert_file)})
        return grpc.ssl_server_certificate_configuration([(key, cert)])


def load_grpc_server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials | None:
    """Server credentials for the gRPC port from the TLS flags; ``None`` means plaintext."""
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        raise PartialTLSConfigError
    keypair = ReloadingKeypair(Path(cert_file), Path(key_file))
    return grpc.dynamic_ssl_server_credentials(keypair.initial, keypair, require_client_authentication=False)
