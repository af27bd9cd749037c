"""The objects of the install agree with each other, with the image and with the server.

Owner: tests of ``config/`` (issue #7). Schema validation (test_schemas.py) cannot see that a
Service's targetPort names a real container port or that the server trusts the operator's
ServiceAccount; these tests do, across objects. They also cover the overlays' objects:
Certificate and Issuer, which no schema checks here, and the ServiceMonitor (schema-checked
too, in test_schemas.py).
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable
from typing import Any

import pytest

from inference_cache import config as config_mod
from inference_cache.extproc import serve

from . import manifests

PUBLIC_PORTS = {"grpc": 9090, "extproc": 9002, "http": 8080}
SERVER_PORTS = {**PUBLIC_PORTS, "snapshot": 8081, "producer": 9091}
BIND_FLAGS = {
    "grpc": "--grpc-bind-address",
    "http": "--http-bind-address",
    "snapshot": "--snapshot-bind-address",
    "extproc": "--extproc-bind-address",
    "producer": "--producer-bind-address",
}
ENGINE_LABEL = "inferencecache.io/engine"
DOCKERFILE = (manifests.REPO / "Dockerfile").read_text()


def flags(container: dict[str, Any]) -> dict[str, str]:
    """``--name=value`` arguments (after the subcommand) as a mapping; bare flags map to ''."""
    out = {}
    for arg in container["args"][1:]:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def server(install: list[dict[str, Any]]) -> dict[str, Any]:
    return manifests.find(install, "Deployment", "inference-cache-server")


@pytest.fixture(scope="module")
def operator(install: list[dict[str, Any]]) -> dict[str, Any]:
    return manifests.find(install, "Deployment", "inference-cache-operator")


def test_everything_namespaced_is_in_our_namespace(install: list[dict[str, Any]]) -> None:
    cluster_scoped = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
    for obj in install:
        assert obj["metadata"].get("namespace") == (
            None if obj["kind"] in cluster_scoped else manifests.NAMESPACE
        ), obj["kind"]
    assert manifests.find(install, "Namespace", manifests.NAMESPACE)


def test_both_deployments_run_the_image_entrypoint_as_its_user(
    server: dict[str, Any], operator: dict[str, Any]
) -> None:
    assert 'ENTRYPOINT ["inference-cache"]' in DOCKERFILE
    uid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    assert uid is not None
    for deployment, subcommand in ((server, "serve"), (operator, "operator")):
        pod = deployment["spec"]["template"]["spec"]
        c = manifests.container(deployment)
        assert c["image"] == "inference-cache:dev"
        assert "command" not in c
        assert c["args"][0] == subcommand
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(
            map(int, uid.groups())
        )
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_the_server_flags_parse_and_trust_only_the_operator(
    server: dict[str, Any], operator: dict[str, Any]
) -> None:
    args = manifests.container(server)["args"]
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    parsed = parser.parse_args(args[1:])
    assert parsed.allowed_controller_sa == manifests.OPERATOR_SA
    assert not parsed.insecure_disable_auth
    sa = operator["spec"]["template"]["spec"]["serviceAccountName"]
    assert f"system:serviceaccount:{manifests.NAMESPACE}:{sa}" == manifests.OPERATOR_SA
    assert server["spec"]["template"]["spec"]["serviceAccountName"] == "inference-cache-server"


def test_server_ports_flags_container_and_service_agree(
    install: list[dict[str, Any]], server: dict[str, Any]
) -> None:
    c = manifests.container(server)
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert container_ports == SERVER_PORTS
    given = flags(c)
    assert {name: given[flag] for name, flag in BIND_FLAGS.items()} == {
        n: f":{p}" for n, p in SERVER_PORTS.items()
    }
    service = manifests.find(install, "Service", "inference-cache-server")
    assert selects(service["spec"]["selector"], labels(server))
    assert {p["name"]: (p["port"], container_ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        n: (p, p) for n, p in SERVER_PORTS.items()
    }


def test_server_probes_use_the_public_http_port(server: dict[str, Any]) -> None:
    c = manifests.container(server)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Graceful shutdown drains 3 gRPC servers and 2 HTTP listeners, up to 5 s each.
    assert server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 25


def test_serve_yaml_is_a_valid_config_with_the_image_tokenizer(
    install: list[dict[str, Any]], server: dict[str, Any]
) -> None:
    c = manifests.container(server)
    config_path = flags(c)["--config"]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in server["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = manifests.find(install, "ConfigMap", volume["configMap"]["name"])
    text = configmap["data"][config_path.rpartition("/")[2]]
    parsed = config_mod.parse(text, source="config/server/serve.yaml")
    assert parsed.endpoints == ()  # discovered in the cluster, never listed here
    (model,) = parsed.models
    assert model.tokenizer == "/opt/inference-cache/tokenizers/qwen"
    assert f"COPY --from=tokenizer /tokenizers/qwen {model.tokenizer}" in DOCKERFILE


def test_serve_yaml_serves_the_models_the_samples_name(install: list[dict[str, Any]]) -> None:
    (configmap,) = manifests.of_kind(install, "ConfigMap")
    served = {m.name for m in config_mod.parse(configmap["data"]["serve.yaml"]).models}
    samples = [
        doc
        for path in sorted((manifests.CONFIG / "samples").glob("*.yaml"))
        for doc in manifests.parse(path.read_text())
        if doc["kind"] == "CacheBackend"
    ]
    named = {
        b["spec"]["gateway"]["modelName"] for b in samples if "modelName" in b["spec"].get("gateway", {})
    }
    assert named, "no sample CacheBackend names a model"
    assert named <= served


def test_the_operator_token_is_for_the_server_audience(operator: dict[str, Any]) -> None:
    c = manifests.container(operator)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "controller-token")
    assert mount["mountPath"] == "/var/run/secrets/inferencecache.io/controller-token"
    volume = next(
        v for v in operator["spec"]["template"]["spec"]["volumes"] if v["name"] == "controller-token"
    )
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token == {
        "audience": config_mod.ServerSettings().controller_audience,
        "expirationSeconds": 3600,
        "path": "token",
    }
    assert flags(c) == {
        "--leader-elect": "",
        "--health-probe-bind-address": ":8081",
        "--webhook-bind-address": ":9443",
        "--webhook-service": "inference-cache-webhook",
    }
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"webhook": 9443, "health": 8081}
    assert c["livenessProbe"]["httpGet"]["port"] == "health"


def test_network_policy_limits_controller_and_producer_ports(
    install: list[dict[str, Any]], server: dict[str, Any], operator: dict[str, Any]
) -> None:
    (policy,) = manifests.of_kind(install, "NetworkPolicy")
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], labels(server))
    assert spec["policyTypes"] == ["Ingress"]
    rules = {frozenset(p["port"] for p in rule["ports"]): rule.get("from") for rule in spec["ingress"]}
    assert rules.keys() == {frozenset(PUBLIC_PORTS.values()), frozenset({8081}), frozenset({9091})}
    assert rules[frozenset(PUBLIC_PORTS.values())] is None  # open
    (controller,) = rules[frozenset({8081})]
    assert controller.keys() == {"podSelector"}  # this namespace only
    assert selects(controller["podSelector"]["matchLabels"], labels(operator))
    assert not selects(controller["podSelector"]["matchLabels"], labels(server))
    (engines,) = rules[frozenset({9091})]
    assert engines == {
        "namespaceSelector": {},
        "podSelector": {"matchExpressions": [{"key": ENGINE_LABEL, "operator": "Exists"}]},
    }


def webhooks(install: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        hook["name"]: hook
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
        for config in manifests.of_kind(install, kind)
        for hook in config["webhooks"]
    }


def test_every_webhook_reaches_the_operator(install: list[dict[str, Any]], operator: dict[str, Any]) -> None:
    service = manifests.find(install, "Service", "inference-cache-webhook")
    assert selects(service["spec"]["selector"], labels(operator))
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in manifests.container(operator)["ports"]}
    assert port["port"] == 443 and port["targetPort"] in container_ports
    hooks = webhooks(install)
    assert sorted(hooks) == [
        "mcachebackend.inferencecache.io",
        "mpod.inferencecache.io",
        "vcachebackend.inferencecache.io",
        "vcachepolicy.inferencecache.io",
        "vcachetenant.inferencecache.io",
    ]
    for name, hook in hooks.items():
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"], svc["port"]) == (
            "inference-cache-webhook",
            manifests.NAMESPACE,
            443,
        ), name
        assert "caBundle" not in hook["clientConfig"]
        assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
        kind = name.split(".")[0][1:]
        prefix = "mutate" if name.startswith("m") else "validate"
        expected = "/mutate--v1-pod" if kind == "pod" else f"/{prefix}-inferencecache-io-v1alpha1-{kind}"
        assert svc["path"] == expected


def test_the_pod_webhook_fails_open_and_skips_our_own_pods(
    install: list[dict[str, Any]], server: dict[str, Any], operator: dict[str, Any]
) -> None:
    hooks = webhooks(install)
    pod = hooks.pop("mpod.inferencecache.io")
    assert pod["failurePolicy"] == "Ignore"
    assert pod["timeoutSeconds"] <= 10
    assert pod["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE"],
            "scope": "Namespaced",
        }
    ]
    (excluded_ns,) = pod["namespaceSelector"]["matchExpressions"]
    assert excluded_ns["operator"] == "NotIn" and manifests.NAMESPACE in excluded_ns["values"]
    (excluded,) = pod["objectSelector"]["matchExpressions"]
    assert excluded["operator"] == "NotIn"
    for deployment in (server, operator):
        assert labels(deployment)[excluded["key"]] in excluded["values"]
    assert {h["failurePolicy"] for h in hooks.values()} == {"Fail"}


def test_rbac_names_the_webhook_configurations_that_exist(install: list[dict[str, Any]]) -> None:
    role = manifests.find(install, "ClusterRole", "inference-cache-operator")
    named = {
        (r["resources"][0], name)
        for r in role["rules"]
        if r["apiGroups"] == ["admissionregistration.k8s.io"]
        for name in r["resourceNames"]
    }
    assert named == {
        ("mutatingwebhookconfigurations", o["metadata"]["name"])
        for o in manifests.of_kind(install, "MutatingWebhookConfiguration")
    } | {
        ("validatingwebhookconfigurations", o["metadata"]["name"])
        for o in manifests.of_kind(install, "ValidatingWebhookConfiguration")
    }


def test_cert_manager_overlay_wires_tls(kustomize: Callable[[str], str]) -> None:
    objs = manifests.parse(kustomize("overlays/cert-manager"))
    certs = {c["metadata"]["name"]: c for c in manifests.of_kind(objs, "Certificate")}
    (issuer,) = manifests.of_kind(objs, "Issuer")
    for cert in certs.values():
        assert cert["metadata"]["namespace"] == manifests.NAMESPACE
        assert cert["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}

    def tls(deployment: str, cert_flag: str, key_flag: str, service: str) -> None:
        dep = manifests.find(objs, "Deployment", deployment)
        c = manifests.container(dep)
        cert_file, key_file = flags(c)[cert_flag], flags(c)[key_flag]
        mount = next(m for m in c["volumeMounts"] if cert_file.startswith(m["mountPath"] + "/"))
        assert key_file.startswith(mount["mountPath"] + "/")
        assert {cert_file.rpartition("/")[2], key_file.rpartition("/")[2]} == {"tls.crt", "tls.key"}
        volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        (cert,) = (c for c in certs.values() if c["spec"]["secretName"] == volume["secret"]["secretName"])
        assert f"{service}.{manifests.NAMESPACE}.svc" in cert["spec"]["dnsNames"]
        assert manifests.find(objs, "Service", service)

    tls("inference-cache-server", "--tls-cert-file", "--tls-key-file", "inference-cache-server")
    tls(
        "inference-cache-operator",
        "--webhook-tls-cert-file",
        "--webhook-tls-key-file",
        "inference-cache-webhook",
    )
    webhook_cert = next(
        c
        for c in certs.values()
        if "inference-cache-webhook.inference-cache-system.svc" in c["spec"]["dnsNames"]
    )
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        (config,) = manifests.of_kind(objs, kind)
        assert config["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{manifests.NAMESPACE}/{webhook_cert['metadata']['name']}"
        }


def test_service_monitor_scrapes_the_server_metrics_port(kustomize: Callable[[str], str]) -> None:
    objs = manifests.parse(kustomize("prometheus"))
    (monitor,) = manifests.of_kind(objs, "ServiceMonitor")
    service = manifests.find(objs, "Service", "inference-cache-server")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_readme_install_command_names_a_real_folder() -> None:
    readme = (manifests.CONFIG / "README.md").read_text()
    for command in re.findall(r"kubectl apply -k (\S+)", readme):
        folder = shlex.split(command)[0].removeprefix("config/")
        assert (manifests.CONFIG / folder / "kustomization.yaml").is_file(), command
