"""``inference-cache operator``: the kopf operator process (issue #7).

Owner: ``inference_cache.operator``. Place in the flow: this module parses the flags the
operator Deployment passes (``config/manager/operator.yaml``), builds one :class:`Kube`
for the handlers, registers the handler modules on a kopf registry, and runs kopf
clusterwide in standalone mode (no peering) next to a small health server
(``/healthz``: the event loop answers; ``/readyz``: kopf finished its startup;
``/metrics``: the operator's Prometheus series, ``operator.metrics``). With
``--leader-elect`` it first waits to hold the Lease (``operator.leader``) and runs kopf only
while it holds it: losing it stops kopf and exits 1 (the Deployment restarts the container
as a standby). A standby serves ``/healthz`` and ``/metrics`` (``inferencecache_operator_leader``
0): its ``/readyz`` stays 503, so the
webhook Service sends admission requests to the leader alone. The
handlers do the work (``operator.handlers_*``), and they decide nothing either: the pure
``desired_*`` functions do.

Webhooks are served by kopf's ``WebhookServer``. kopf's own management of the webhook
configurations is off: the manifests own them (paths, failure policies). With certificate
files (the cert-manager overlay mounts them) cert-manager's CA injector fills their
``caBundle``; without (the default install) the operator makes its own CA and serving
certificate at startup and writes the CA into them itself (``operator.certs``).
``--webhook-bind-address=0`` disables webhooks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp.web
import kopf
import kubernetes.config
from kubernetes import client as k8s
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from inference_cache.operator import (
    backend,
    certs,
    gateway,
    handlers_backend,
    handlers_controlplane,
    handlers_webhooks,
    leader,
    server_client,
    webhook,
)
from inference_cache.operator.kube import Kube
from inference_cache.operator.metrics import METRICS, OperatorMetrics

DEFAULT_SERVER_URL: Final = "http://inference-cache-server:8081"
DEFAULT_SERVER_SERVICE: Final = "inference-cache-server"
DEFAULT_TOKEN_FILE: Final = "/var/run/secrets/inferencecache.io/controller-token/token"
DEFAULT_NAMESPACE: Final = "inference-cache-system"
#: Where config/manager mounts the optional Secret inference-cache-webhook-signing (key ``key``).
DEFAULT_SIGNING_KEY_FILE: Final = Path("/var/run/secrets/inferencecache.io/webhook-signing/key")
#: kopf's progress and last-handled-configuration annotations go under our API group.
ANNOTATIONS_PREFIX: Final = backend.GROUP

log = logging.getLogger(__name__)

#: A bind address: ``(host, port)``; host ``None`` = every interface.
BindAddress = tuple[str | None, int]


def bind_address(text: str) -> BindAddress | None:
    """``":8081"``, ``"127.0.0.1:8081"``, ``"[::1]:8081"``; ``"0"`` (or empty) disables
    the listener, as in controller-runtime's flags of the same names."""
    if text in ("", "0"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not [host]:port or 0")
    host = host.removeprefix("[").removesuffix("]")
    return (host or None, int(port))


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    """Everything the operator process needs, from the flags."""

    namespace: str
    server_url: str
    server_service: str
    extproc_port: int
    controller_token_file: Path
    health: BindAddress | None
    webhook: BindAddress | None
    webhook_service: str
    webhook_cert_file: Path | None
    webhook_key_file: Path | None
    leader_elect: bool
    #: HMAC key of the ``injected-by-signature`` annotation (the optional Secret
    #: ``inference-cache-webhook-signing`` mounted here); a missing file: no signature.
    webhook_signing_key_file: Path = DEFAULT_SIGNING_KEY_FILE


class ConfigError(ValueError):
    """A flag combination the operator cannot run with (exit code 2)."""


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    cert, key = args.webhook_tls_cert_file, args.webhook_tls_key_file
    if (cert is None) != (key is None):
        raise ConfigError("--webhook-tls-cert-file and --webhook-tls-key-file go together")
    return OperatorConfig(
        namespace=args.namespace,
        server_url=args.server_url,
        server_service=args.server_service,
        extproc_port=args.extproc_port,
        controller_token_file=args.controller_token_file,
        health=args.health_probe_bind_address,
        webhook=args.webhook_bind_address,
        webhook_service=args.webhook_service,
        webhook_cert_file=cert,
        webhook_key_file=key,
        leader_elect=args.leader_elect,
        webhook_signing_key_file=args.webhook_signing_key_file,
    )


def webhook_settings(config: OperatorConfig) -> webhook.WebhookSettings:
    """The pod webhook's settings: the signing key read from
    ``config.webhook_signing_key_file`` (absent: injections are not signed, logged).
    Raises :class:`ConfigError` when the file exists but cannot be read or is empty."""
    path = config.webhook_signing_key_file
    if not path.exists():
        log.info("no webhook signing key at %s: injected-by annotations are not signed", path)
        return webhook.WebhookSettings()
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"--webhook-signing-key-file {path}: {e}") from e
    if not key:
        raise ConfigError(f"--webhook-signing-key-file {path} is empty")
    return webhook.WebhookSettings(signing_key=key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help=f"run kopf only while holding the Lease {leader.LEASE_NAME} (identity: the pod name)",
    )
    parser.add_argument(
        "--health-probe-bind-address",
        type=bind_address,
        default=bind_address(":8081"),
        metavar="ADDR",
        help="/healthz, /readyz and /metrics ([host]:port, 0 disables; default :8081)",
    )
    parser.add_argument(
        "--webhook-bind-address",
        type=bind_address,
        default=bind_address(":9443"),
        metavar="ADDR",
        help="admission webhooks over TLS ([host]:port, 0 disables; default :9443)",
    )
    parser.add_argument(
        "--webhook-service",
        default="inference-cache-webhook",
        help="the Service in front of the webhooks (the host name the certificate names)",
    )
    parser.add_argument(
        "--webhook-tls-cert-file",
        type=Path,
        metavar="PEM",
        help="webhook serving cert (default: self-signed, its CA written into the webhook configurations)",
    )
    parser.add_argument("--webhook-tls-key-file", type=Path, metavar="PEM", help="its private key")
    parser.add_argument(
        "--webhook-signing-key-file",
        type=Path,
        default=DEFAULT_SIGNING_KEY_FILE,
        metavar="FILE",
        help="HMAC key signing the injected-by annotations (a missing file: unsigned; "
        f"default {DEFAULT_SIGNING_KEY_FILE})",
    )
    parser.add_argument(
        "--server-url",
        default=DEFAULT_SERVER_URL,
        help=f"the server's controller listener: /snapshot, /policy, /templates ({DEFAULT_SERVER_URL})",
    )
    parser.add_argument(
        "--server-service",
        default=DEFAULT_SERVER_SERVICE,
        help="the server's Service, in the operator's namespace: the ext_proc endpoint of gateway objects",
    )
    parser.add_argument("--extproc-port", type=int, default=9002, help="its ext_proc Service port")
    parser.add_argument(
        "--controller-token-file",
        type=Path,
        default=Path(DEFAULT_TOKEN_FILE),
        metavar="PATH",
        help="projected ServiceAccount token for the server (audience inferencecache.io/controller)",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
        help="the operator's namespace (default: $POD_NAMESPACE, else inference-cache-system)",
    )


# -- wiring --------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def backend_settings(config: OperatorConfig) -> handlers_backend.BackendHandlerSettings:
    return handlers_backend.BackendHandlerSettings(
        gateway=gateway.GatewaySettings(
            service_name=config.server_service,
            service_namespace=config.namespace,
            extproc_port=config.extproc_port,
        )
    )


LoginFn = Callable[..., Any]


def build_registry(
    config: OperatorConfig,
    kube: Kube,
    *,
    login: LoginFn = kopf.login_via_client,
    metrics: OperatorMetrics = METRICS,
) -> kopf.OperatorRegistry:
    """A registry holding the login handler and every handler module's handlers: the
    CacheBackend reconciler, the control-plane loops (``/policy``, ``/snapshot``,
    ``/templates`` against ``config.server_url``) and, unless webhooks are disabled, the
    admission handlers (kopf stops the operator when admission handlers have no server);
    all of them counting into ``metrics``."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry, id="login")(login)
    handlers_backend.register(registry, kube, backend_settings(config), metrics=metrics)
    server = server_client.ServerClient(
        server_client.ServerClientSettings(url=config.server_url, token_file=config.controller_token_file),
        metrics=metrics,
    )
    plane = handlers_controlplane.ControlPlane(
        kube,
        server,
        handlers_controlplane.ControlPlaneSettings(observed_server=config.server_url),
        metrics=metrics,
    )
    handlers_controlplane.register(registry, plane)
    if config.webhook is not None:
        handlers_webhooks.register(registry, kube, webhook_settings(config), metrics=metrics)
    return registry


def kopf_settings(config: OperatorConfig, generated: certs.CertFiles | None = None) -> kopf.OperatorSettings:
    """kopf's settings; the webhook server uses the certificate files of the flags, else
    ``generated`` (:func:`webhook_certificates`)."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATIONS_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATIONS_PREFIX}/kopf-finalizer"
    # Our handlers post their own transition Events; kopf's per-handler ones only on trouble.
    settings.posting.level = logging.WARNING
    settings.admission.managed = None
    # No CRD watching (RBAC grants get/list only): the resources we serve are known at start;
    # a gateway CRD installed later is seen by the reconciler's own crd_names() check.
    settings.scanning.disabled = True
    if config.webhook is not None:
        files = mounted_certificates(config) or generated
        if files is None:  # kopf would try to make its own with the certbuilder package
            raise ValueError("webhooks need certificate files: mounted or generated")
        host, port = config.webhook
        settings.admission.server = kopf.WebhookServer(
            addr=host,
            port=port,
            host=certs.service_dns_names(config.webhook_service, config.namespace)[0],
            cafile=files.cafile,
            certfile=files.certfile,
            pkeyfile=files.pkeyfile,
        )
    return settings


def mounted_certificates(config: OperatorConfig) -> certs.CertFiles | None:
    """The files of ``--webhook-tls-cert-file``/``--webhook-tls-key-file``, if given."""
    if config.webhook_cert_file is None or config.webhook_key_file is None:
        return None
    return certs.CertFiles(certfile=config.webhook_cert_file, pkeyfile=config.webhook_key_file)


@contextlib.asynccontextmanager
async def webhook_certificates(
    config: OperatorConfig,
    kube: Kube,
    *,
    clock: Callable[[], dt.datetime] = _utcnow,
) -> AsyncIterator[certs.CertFiles | None]:
    """Without webhooks, or with mounted certificate files: ``None``. Otherwise a new CA
    and serving certificate in a temporary directory (removed on exit), and a background
    task writing the CA into the webhook configurations (retried until it succeeds,
    cancelled on exit)."""
    if config.webhook is None or mounted_certificates(config) is not None:
        yield None
        return
    names = certs.service_dns_names(config.webhook_service, config.namespace)
    certificate = certs.generate(names, now=clock())
    log.info("webhook certificate for %s signed by a new self-signed CA", ", ".join(names))
    with tempfile.TemporaryDirectory(prefix="inference-cache-webhook-") as directory:
        files = certs.write_files(certificate, Path(directory))
        injecting = asyncio.create_task(certs.inject_ca(kube, certificate.ca_pem, clock=clock))
        try:
            yield files
        finally:
            injecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await injecting


@contextlib.asynccontextmanager
async def health_server(
    address: BindAddress | None, ready: asyncio.Event, metrics: OperatorMetrics = METRICS
) -> AsyncIterator[None]:
    """``/healthz`` (200 while the loop serves), ``/readyz`` (200 once ``ready`` is set)
    and ``/metrics`` (``metrics`` in the Prometheus text format, leader or standby)."""
    if address is None:
        yield
        return

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="ok")

    async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if ready.is_set():
            return aiohttp.web.Response(text="ok")
        return aiohttp.web.Response(status=503, text="starting")

    async def scrape(_: aiohttp.web.Request) -> aiohttp.web.Response:
        response = aiohttp.web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    app = aiohttp.web.Application()
    app.add_routes(
        [
            aiohttp.web.get("/healthz", healthz),
            aiohttp.web.get("/readyz", readyz),
            aiohttp.web.get("/metrics", scrape),
        ]
    )
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, address[0], address[1]).start()
        yield
    finally:
        await runner.cleanup()


async def operate(
    config: OperatorConfig,
    registry: kopf.OperatorRegistry,
    kube: Kube,
    *,
    elector: leader.LeaderElector | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    metrics: OperatorMetrics = METRICS,
) -> None:
    """kopf (clusterwide, standalone), the health server and, without mounted certificate
    files, the operator's own webhook certificate, until stopped (a signal, or
    ``stop_flag``). With ``elector``: the health server first, then kopf once the lease is
    held, stopped with :class:`leader.LeaseLost` raised when it is lost. The leader gauge
    of ``metrics`` is 1 from the lease (or the start, without ``elector``) until kopf stops."""
    ready = ready_flag or asyncio.Event()
    stop = stop_flag or asyncio.Event()
    metrics.leader.set(0)
    async with health_server(config.health, ready, metrics):
        if elector is not None:
            await elector.acquire()
        metrics.leader.set(1)
        try:
            async with webhook_certificates(config, kube) as generated, leader.leading(elector, stop):
                await kopf.operator(
                    registry=registry,
                    settings=kopf_settings(config, generated),
                    standalone=True,
                    clusterwide=True,
                    stop_flag=stop,
                    ready_flag=ready,
                )
        finally:
            metrics.leader.set(0)


def _api_client() -> k8s.ApiClient:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"inference-cache operator: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        api = _api_client()
    except kubernetes.config.ConfigException as e:
        print(f"inference-cache operator: error: no cluster credentials: {e}", file=sys.stderr)
        return 1
    with api:
        kube = Kube(api, clock=_utcnow)
        elector = None
        if config.leader_elect:
            # A pod's host name is its name: a restarted container renews its own lease.
            settings = leader.LeaseSettings(namespace=config.namespace, identity=socket.gethostname())
            elector = leader.LeaderElector(kube, settings)
        try:
            registry = build_registry(config, kube)
        except ConfigError as e:
            print(f"inference-cache operator: error: {e}", file=sys.stderr)
            return 2
        try:
            asyncio.run(operate(config, registry, kube, elector=elector))
        except leader.LeaseLost as e:
            print(f"inference-cache operator: {e}", file=sys.stderr)
            return 1
    return 0
