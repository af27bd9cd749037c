"""``inference-cache operator`` (operator/main.py): the flags the manifests pass, the exit
code 2 for bad flags, kopf's settings, and the whole process (kopf + the health server +
the CacheBackend handler; kopf's webhook server with the operator's own certificate, its CA
written into the webhook configurations) against kmock's Kubernetes emulator."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from kubernetes import client as k8s

from inference_cache import cli
from inference_cache.operator import certs, kube, main
from inference_cache.operator.metrics import METRICS

MANIFEST_ARGS = [
    "--leader-elect",
    "--health-probe-bind-address=:8081",
    "--webhook-bind-address=:9443",
    "--webhook-service=inference-cache-webhook",
]


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(["operator", *argv]).parse_args(["operator", *argv])


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["operator", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in [*MANIFEST_ARGS, "--webhook-tls-cert-file", "--server-url", "--controller-token-file"]:
        assert flag.split("=")[0] in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-flag"],
        ["--health-probe-bind-address=8081"],
        ["--webhook-bind-address=:99999"],
        ["--health-probe-bind-address=host:"],
        ["--extproc-port=x"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["operator", *argv])
    assert exit_.value.code == 2
    assert "usage: inference-cache" in capsys.readouterr().err


def test_the_default_install_flags_are_accepted_without_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No cluster here: past the flags, the operator stops at the missing credentials (1).
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    assert cli.main(["operator", *MANIFEST_ARGS]) == 1
    assert "no cluster credentials" in capsys.readouterr().err


def test_key_without_cert_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["operator", *MANIFEST_ARGS, f"--webhook-tls-key-file={tmp_path / 'tls.key'}"]) == 2
    assert "go together" in capsys.readouterr().err


def test_cert_without_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["operator", "--webhook-bind-address=0", f"--webhook-tls-cert-file={tmp_path / 'tls.crt'}"]
    assert cli.main(argv) == 2
    assert "go together" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "address"),
    [
        (":8081", (None, 8081)),
        ("127.0.0.1:9443", ("127.0.0.1", 9443)),
        ("[::1]:9443", ("::1", 9443)),
        ("0", None),
        ("", None),
    ],
)
def test_bind_address(text: str, address: main.BindAddress | None) -> None:
    assert main.bind_address(text) == address


def test_config_from_the_manifest_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "ic-system")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    config = main.config_from_args(
        parse(*MANIFEST_ARGS, f"--webhook-tls-cert-file={cert}", f"--webhook-tls-key-file={key}")
    )
    assert config == main.OperatorConfig(
        namespace="ic-system",
        server_url="http://inference-cache-server:8081",
        server_service="inference-cache-server",
        extproc_port=9002,
        controller_token_file=Path("/var/run/secrets/inferencecache.io/controller-token/token"),
        health=(None, 8081),
        webhook=(None, 9443),
        webhook_service="inference-cache-webhook",
        webhook_cert_file=cert,
        webhook_key_file=key,
        leader_elect=True,
    )
    settings = main.kopf_settings(config)
    assert settings.admission.managed is None
    assert settings.scanning.disabled  # RBAC grants no watch on CRDs
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert (server.addr, server.port, server.certfile, server.pkeyfile) == (None, 9443, cert, key)
    assert server.cafile is None  # cert-manager injects the CA
    assert server.host == "inference-cache-webhook.ic-system.svc"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.persistence.progress_storage.prefix == "inferencecache.io"
    gw = main.backend_settings(config).gateway
    assert (gw.service_name, gw.service_namespace, gw.extproc_port) == (
        "inference-cache-server",
        "ic-system",
        9002,
    )


def test_generated_certificate_files_go_to_the_webhook_server(tmp_path: Path) -> None:
    config = main.config_from_args(parse(*MANIFEST_ARGS, "--namespace=ic"))
    with pytest.raises(ValueError, match="certificate files"):
        main.kopf_settings(config)
    files = certs.CertFiles(certfile=tmp_path / "c", pkeyfile=tmp_path / "k", cafile=tmp_path / "ca")
    server = main.kopf_settings(config, files).admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert (server.cafile, server.certfile, server.pkeyfile) == (files.cafile, files.certfile, files.pkeyfile)
    assert server.host == "inference-cache-webhook.ic.svc"


def test_webhooks_disabled_means_no_server() -> None:
    config = main.config_from_args(parse("--webhook-bind-address=0"))
    assert config.webhook is None
    assert main.kopf_settings(config).admission.server is None


# -- the whole process against the emulator -------------------------------------------

BACKENDS = kmock.resource("inferencecache.io", "v1alpha1", "cachebackends")
PODS = kmock.resource("", "v1", "pods")


def _reconciles_ok(text: str) -> float:
    """The CacheBackend handler runs with outcome ok in a ``/metrics`` text, summed."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("inferencecache_operator_handler_runs_total{") and 'kind="CacheBackend"' in line:
            total += float(line.rsplit(" ", 1)[1]) if 'outcome="ok"' in line else 0.0
    return total


async def _get(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def _until(condition: Any, what: str, deadline_s: float = 20.0) -> None:
    """Poll a real condition with a bounded deadline (I/O across kopf's threads)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not await condition():
        if loop.time() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_operator_reconciles_a_backend_and_reports_health(
    kmock: kmock.KubernetesEmulator,
    samples: dict[str, dict[str, Any]],
    unused_tcp_port: int,
) -> None:
    kmock.resources["inferencecache.io/v1alpha1/cachebackends"] = kmock.ResourceInfo(
        kind="CacheBackend", namespaced=True, verbs={"list", "watch", "patch", "get"}, subresources={"status"}
    )
    # kopf waits for these in discovery before it starts watching.
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list"})
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
    )
    cr = copy.deepcopy(samples["cache_v1alpha1_cachebackend_routing.yaml"])
    cr["metadata"] |= {"namespace": "llm", "uid": "u-1", "generation": 1, "resourceVersion": "1"}
    kmock.objects[BACKENDS, "llm", cr["metadata"]["name"]] = cr
    kmock["list", PODS] << {"metadata": {}, "items": []}
    kmock["list", kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")] << {
        "metadata": {},
        "items": [],
    }

    config = main.config_from_args(
        parse("--webhook-bind-address=0", f"--health-probe-bind-address=127.0.0.1:{unused_tcp_port}")
    )

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"))

    api_config = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    api_config.retries = 0
    stop, ready = asyncio.Event(), asyncio.Event()
    before = _reconciles_ok(METRICS.exposition().decode())
    with k8s.ApiClient(api_config) as api:
        kube_ = kube.Kube(api, timeout_s=10)
        registry = main.build_registry(config, kube_, login=login)
        task = asyncio.create_task(main.operate(config, registry, kube_, stop_flag=stop, ready_flag=ready))
        try:
            health = f"http://127.0.0.1:{unused_tcp_port}"

            async def serving() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    return await _get(f"{health}/healthz") == 200
                return False

            await _until(serving, "/healthz")

            async def ready_() -> bool:
                return await _get(f"{health}/readyz") == 200

            await _until(ready_, "/readyz")
            assert ready.is_set()

            async def reconciled() -> bool:
                status = kmock.objects[BACKENDS, "llm", cr["metadata"]["name"]].get("status") or {}
                return "conditions" in status

            await _until(reconciled, "the CacheBackend status")
            status = kmock.objects[BACKENDS, "llm", cr["metadata"]["name"]]["status"]
            assert status["matchedEnginePods"] == 0
            assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "NoEnginePods"
            assert status["observedGeneration"] == 1
            assert status["gateway"] == {"emitted": [], "skipped": []}

            async def counted() -> bool:  # the run is counted once the handler returned
                async with aiohttp.ClientSession() as session, session.get(f"{health}/metrics") as r:
                    return _reconciles_ok(await r.text()) > before

            await _until(counted, "the reconcile counted on /metrics")
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)


@pytest.mark.parametrize("webhooks", [True, False])
def test_registry_holds_every_handler_module(tmp_path: Path, webhooks: bool) -> None:
    argv = [f"--webhook-tls-cert-file={tmp_path / 'c'}", f"--webhook-tls-key-file={tmp_path / 'k'}"]
    config = main.config_from_args(parse(*(argv if webhooks else ["--webhook-bind-address=0"])))
    registry = main.build_registry(config, kube.Kube(k8s.ApiClient()))
    changing = {h.id for h in registry._changing.get_all_handlers()}
    assert {"reconcile-create", "reconcile-update", "reconcile-resume"} <= changing
    activities = {h.id for h in registry._activities.get_all_handlers()}
    assert {"login", "control-plane-start", "control-plane-stop"} <= activities
    admission = {h.id for h in registry._webhooks.get_all_handlers()}
    # kopf refuses to run admission handlers without a server: none when disabled.
    assert ("mutate--v1-pod" in admission) is webhooks
    assert bool(admission) is webhooks


MUTATING = kmock.resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
VALIDATING = kmock.resource("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations")


async def test_operator_serves_webhooks_with_its_own_certificate(
    kmock: kmock.KubernetesEmulator, unused_tcp_port: int
) -> None:
    """The default install: no certificate files. The CA the operator writes into both
    webhook configurations verifies the certificate its webhook server presents for the
    Service's name."""
    for plural, kind in [("cachebackends", "CacheBackend"), ("cachepolicies", "CachePolicy")]:
        kmock.resources[f"inferencecache.io/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs={"list", "watch", "patch", "get"}, subresources={"status"}
        )
    kmock.resources["inferencecache.io/v1alpha1/cachetenants"] = kmock.ResourceInfo(
        kind="CacheTenant", namespaced=False, verbs={"list", "watch", "patch", "get"}, subresources={"status"}
    )
    kmock.resources["v1/pods"] = kmock.ResourceInfo(
        kind="Pod", namespaced=True, verbs={"list", "watch", "get"}
    )
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list"})
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
    )
    for resource, kind, name in [
        (MUTATING, "MutatingWebhookConfiguration", "inference-cache-mutating-webhook"),
        (VALIDATING, "ValidatingWebhookConfiguration", "inference-cache-validating-webhook"),
    ]:
        kmock.objects[resource, None, name] = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "webhooks": [{"name": f"{kind[0].lower()}.inferencecache.io", "clientConfig": {}}],
        }
    config = main.config_from_args(
        parse(
            *MANIFEST_ARGS,
            "--health-probe-bind-address=0",
            f"--webhook-bind-address=127.0.0.1:{unused_tcp_port}",
        )
    )
    assert main.mounted_certificates(config) is None

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"))

    api_config = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    api_config.retries = 0
    stop = asyncio.Event()
    with k8s.ApiClient(api_config) as api:
        kube_ = kube.Kube(api, timeout_s=10)
        task = asyncio.create_task(
            main.operate(config, main.build_registry(config, kube_, login=login), kube_, stop_flag=stop)
        )
        try:

            async def injected() -> bool:
                return len(kmock["patch"]) == 2

            await _until(injected, "the caBundle patches")
            bundles = set()
            for req, resource in zip(kmock["patch"], [MUTATING, VALIDATING], strict=True):
                assert req.url.path.startswith(f"/apis/admissionregistration.k8s.io/v1/{resource.plural}/")
                assert req.headers["Content-Type"] == "application/strategic-merge-patch+json"
                ((webhook,),) = req.data.values()
                assert webhook.keys() == {"name", "clientConfig"} and webhook["clientConfig"].keys() == {
                    "caBundle"
                }
                bundles.add(webhook["clientConfig"]["caBundle"])
            (bundle,) = bundles
            trust = ssl.create_default_context(cadata=base64.b64decode(bundle).decode("ascii"))

            async def serving() -> bool:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(
                        "127.0.0.1",
                        unused_tcp_port,
                        ssl=trust,
                        server_hostname="inference-cache-webhook.inference-cache-system.svc",
                    )
                    writer.close()
                    await writer.wait_closed()
                    return True
                return False

            await _until(serving, "a verified TLS handshake with the webhook server")
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection(
                    "127.0.0.1",
                    unused_tcp_port,
                    ssl=trust,
                    server_hostname="inference-cache-webhook.other.svc",
                )
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)


def test_webhook_signing_key_comes_from_the_mounted_secret(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"s3cret\n")
    config = main.config_from_args(parse("--webhook-signing-key-file", str(key)))
    assert main.webhook_settings(config).signing_key == b"s3cret"


def test_no_signing_key_file_means_unsigned_injections(tmp_path: Path) -> None:
    config = main.config_from_args(parse("--webhook-signing-key-file", str(tmp_path / "absent")))
    assert main.webhook_settings(config).signing_key == b""
    assert main.config_from_args(parse()).webhook_signing_key_file == main.DEFAULT_SIGNING_KEY_FILE


def test_an_empty_signing_key_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\n")
    config = main.config_from_args(parse("--webhook-signing-key-file", str(key)))
    with pytest.raises(main.ConfigError, match="empty"):
        main.webhook_settings(config)
