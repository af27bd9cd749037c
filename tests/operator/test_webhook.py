"""Admission webhooks: AdmissionReview v1 JSON in, JSONPatch out, applied to the pod and
validated against the Kubernetes 1.31 Pod schema; CRD defaulting and validation tables."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import kopf
import kubernetes_validate
import pytest

from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.operator import crds, webhook
from inference_cache.operator.webhook import (
    ANNOTATION_INJECTED_BY,
    ANNOTATION_INJECTED_BY_SIGNATURE,
    ANNOTATION_INJECTED_BY_UID,
    ANNOTATION_SKIP,
    FieldError,
    Mutation,
    WebhookSettings,
)

from . import crd_validate

NS = "team-a"
SETTINGS = WebhookSettings(signing_key=b"test-signing-key")
KV_EVENTS = {
    "enable_kv_cache_events": True,
    "publisher": "zmq",
    "endpoint": "tcp://*:5557",
    "replay_endpoint": "tcp://*:5657",
    "topic": "kv-events",
}
LMCACHE_ENV = {
    "LMCACHE_REMOTE_URL": "lm://lmcache.team-a.svc.cluster.local:65432",
    "LMCACHE_REMOTE_SERDE": "naive",
    "LMCACHE_CHUNK_SIZE": "256",
    "LMCACHE_LOCAL_CPU": "False",
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "20",
}


# -- fixtures: what the apiserver sends for a Deployment's pod --------------------------------


def engine_pod(
    command: list[str] | None = None,
    args: list[str] | None = None,
    *,
    annotations: dict[str, str] | None = None,
    env: list[dict[str, Any]] | None = None,
    sidecar_first: bool = False,
) -> dict[str, Any]:
    """A ReplicaSet-created pod after the built-in admission plugins (defaults, SA token)."""
    vllm: dict[str, Any] = {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.11.0",
        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
        "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}},
        "volumeMounts": [
            {
                "name": "kube-api-access-x7k2p",
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    if command is not None:
        vllm["command"] = command
    if args is not None:
        vllm["args"] = args
    if env is not None:
        vllm["env"] = env
    containers = [vllm]
    if sidecar_first:
        containers.insert(
            0, {"name": "log-shipper", "image": "fluent/fluent-bit:3.1", "args": ["-c", "/x.conf"]}
        )
    metadata: dict[str, Any] = {
        "generateName": "qwen-5c9f7d8b6d-",
        "namespace": NS,
        "creationTimestamp": None,
        "labels": {"app": "qwen", "inferencecache.io/engine": "qwen", "pod-template-hash": "5c9f7d8b6d"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "qwen-5c9f7d8b6d",
                "uid": "0b1e9c43-1f4e-4b8e-9a53-1c2f3d4e5f60",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": metadata,
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access-x7k2p",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                }
            ],
            "containers": containers,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }


def admission_review(
    pod: dict[str, Any], uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002"
) -> dict[str, Any]:
    """An AdmissionReview v1 request as kube-apiserver 1.31 posts it for a Pod CREATE."""
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a3a0b6b2-7d0e-4d43-9a77-5b0b6a7c4c11",
                "groups": [
                    "system:serviceaccounts",
                    "system:serviceaccounts:kube-system",
                    "system:authenticated",
                ],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def cache_backend(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "LMCache",
        "engineSelector": {"matchLabels": {"inferencecache.io/engine": "qwen"}},
        "integration": {"engine": "vllm", "role": "ReadWrite"},
    }
    base.update(spec)
    return {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "metadata": {"name": "lmcache", "namespace": NS, "uid": "6f1c2d3e-0000-4000-8000-00000000cb01"},
        "spec": base,
        "status": {"endpoint": "lmcache.team-a.svc.cluster.local:65432"},
    }


# -- helpers --------------------------------------------------------------------------------------


def respond(
    review: dict[str, Any], backend: dict[str, Any] | None, settings: WebhookSettings = SETTINGS
) -> dict[str, Any]:
    """The webhook's wire answer, through JSON both ways like the HTTP server."""
    wire_in = json.loads(json.dumps(review))

    def mutate(request: dict[str, Any]) -> Mutation:
        pod = request["object"]
        return webhook.mutate_engine_pod(
            pod, webhook.select_backend(pod, [] if backend is None else [backend]), settings
        )

    return json.loads(json.dumps(webhook.admission_review_response(wire_in, mutate)))


def admit(
    pod: dict[str, Any], backend: dict[str, Any] | None, settings: WebhookSettings = SETTINGS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pod as stored after the patch, the response payload); the pod is schema-checked."""
    review = admission_review(pod)
    out = respond(review, backend, settings)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    response = out["response"]
    assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
    patched = copy.deepcopy(pod)
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        patched = jsonpatch.apply_patch(pod, ops)
    else:
        assert "patchType" not in response
    kubernetes_validate.validate(patched, "1.31", strict=True)
    return patched, response


def engine(pod: dict[str, Any], name: str = "vllm") -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def flag(container: dict[str, Any], name: str) -> str | None:
    tokens = argv(container)
    values = [tokens[i + 1] for i, t in enumerate(tokens) if t == name]
    values += [t.split("=", 1)[1] for t in tokens if t.startswith(name + "=")]
    assert len(values) <= 1, f"{name} appears {len(values)} times in {tokens}"
    return values[0] if values else None


def env(container: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v.get("value", "") for v in container.get("env", [])}


def readmit(pod: dict[str, Any], backend: dict[str, Any] | None) -> dict[str, Any]:
    """Mutating an already-mutated pod must add nothing."""
    _, response = admit(pod, backend)
    assert "patch" not in response
    return response


VLLM_SERVE = (["vllm", "serve", "Qwen/Qwen3-0.6B"], ["--port", "8000", "--block-size", "16"])
API_SERVER = (["python3", "-m", "vllm.entrypoints.openai.api_server"], ["--model", "Qwen/Qwen3-0.6B"])


# -- the Pod webhook ------------------------------------------------------------------------------


def test_vllm_serve_pod_gets_kv_events_hash_settings_and_lmcache() -> None:
    backend = cache_backend()
    pod, response = admit(engine_pod(*VLLM_SERVE), backend)
    c = engine(pod)
    assert c["command"] == ["vllm", "serve", "Qwen/Qwen3-0.6B"]
    assert c["args"][:4] == ["--port", "8000", "--block-size", "16"]
    assert json.loads(flag(c, "--kv-events-config") or "") == KV_EVENTS
    assert flag(c, "--prefix-caching-hash-algo") == "sha256_cbor"
    assert json.loads(flag(c, "--kv-transfer-config") or "") == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
    }
    assert env(c) == {"PYTHONHASHSEED": "0", **LMCACHE_ENV}
    annotations = pod["metadata"]["annotations"]
    assert annotations[ANNOTATION_INJECTED_BY] == "team-a/lmcache"
    assert annotations[ANNOTATION_INJECTED_BY_UID] == backend["metadata"]["uid"]
    assert webhook.verify_injection(pod, SETTINGS)
    assert "warnings" not in response
    readmit(pod, backend)


def test_api_server_entrypoint_with_equals_form_transfer_config_is_replaced_in_place() -> None:
    command, args = API_SERVER
    args = [
        *args,
        '--kv-transfer-config={"kv_connector":"Other","kv_role":"kv_both"}',
        "--max-model-len",
        "8192",
    ]
    backend = cache_backend(integration={"engine": "vllm", "role": "ReadOnly"})
    pod, _ = admit(engine_pod(command, args, env=[{"name": "HF_HOME", "value": "/models"}]), backend)
    c = engine(pod)
    assert c["command"] == command
    assert c["args"][:5] == [
        "--model",
        "Qwen/Qwen3-0.6B",
        "--kv-transfer-config",
        '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_consumer"}',
        "--max-model-len",
    ]
    assert list(env(c)) == ["HF_HOME", "PYTHONHASHSEED", *LMCACHE_ENV]
    readmit(pod, backend)


def test_flags_in_the_command_are_edited_where_they_are() -> None:
    command = ["vllm", "serve", "m", "--kv_transfer_config", '{"kv_connector":"X"}']
    pod, _ = admit(engine_pod(command, None), cache_backend())
    c = engine(pod)
    assert c["command"] == ["vllm", "serve", "m", "--kv-transfer-config", c["command"][4]]
    assert json.loads(c["command"][4])["kv_connector"] == "LMCacheConnectorV1"
    assert flag(c, "--kv-events-config") is not None and "args" in c


def test_existing_kv_events_config_is_kept_with_a_warning_when_it_differs() -> None:
    theirs = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6000"})
    command, args = VLLM_SERVE
    pod, response = admit(engine_pod(command, [*args, f"--kv-events-config={theirs}"]), cache_backend())
    c = engine(pod)
    assert flag(c, "--kv-events-config") == theirs
    assert [w for w in response["warnings"] if "--kv-events-config" in w and "endpoint, replay_endpoint" in w]
    assert flag(c, "--prefix-caching-hash-algo") == "sha256_cbor"


def test_existing_matching_kv_events_config_is_silent() -> None:
    command, args = VLLM_SERVE
    pod, response = admit(
        engine_pod(command, [*args, "--kv-events-config", json.dumps(KV_EVENTS)]), cache_backend()
    )
    assert json.loads(flag(engine(pod), "--kv-events-config") or "") == KV_EVENTS
    assert "warnings" not in response


def test_user_hash_settings_are_kept_with_warnings() -> None:
    command, args = VLLM_SERVE
    pod, response = admit(
        engine_pod(
            command,
            [*args, "--prefix-caching-hash-algo=xxhash"],
            env=[{"name": "PYTHONHASHSEED", "value": "7"}],
        ),
        cache_backend(),
    )
    c = engine(pod)
    assert flag(c, "--prefix-caching-hash-algo") == "xxhash" and env(c)["PYTHONHASHSEED"] == "7"
    assert len([w for w in response["warnings"] if "xxhash" in w or "PYTHONHASHSEED" in w]) == 2


@pytest.mark.parametrize("value", ["true", "yes", "1", "anything"])
def test_skip_annotation_opts_out(value: str) -> None:
    pod, response = admit(engine_pod(*VLLM_SERVE, annotations={ANNOTATION_SKIP: value}), cache_backend())
    assert "patch" not in response and "args" in engine(pod) and "env" not in engine(pod)


@pytest.mark.parametrize("value", ["false", "0", "Off", "disabled", ""])
def test_falsey_skip_annotation_still_injects(value: str) -> None:
    pod, _ = admit(engine_pod(*VLLM_SERVE, annotations={ANNOTATION_SKIP: value}), cache_backend())
    assert pod["metadata"]["annotations"][ANNOTATION_SKIP] == value
    assert env(engine(pod))["PYTHONHASHSEED"] == "0"


FORGED = {
    ANNOTATION_INJECTED_BY: "team-a/lmcache",
    ANNOTATION_INJECTED_BY_UID: "6f1c2d3e-0000-4000-8000-00000000cb01",
    ANNOTATION_INJECTED_BY_SIGNATURE: "v1:" + "0" * 64,
    "team/owner": "alice",
}


def test_forged_annotations_on_a_skipped_pod_are_removed() -> None:
    pod, response = admit(
        engine_pod(*VLLM_SERVE, annotations={**FORGED, ANNOTATION_SKIP: "true"}), cache_backend()
    )
    assert pod["metadata"]["annotations"] == {"team/owner": "alice", ANNOTATION_SKIP: "true"}
    assert "patch" in response


def test_forged_annotations_on_an_unmatched_pod_are_removed() -> None:
    pod, _ = admit(engine_pod(*VLLM_SERVE, annotations=dict(FORGED)), None)
    assert pod["metadata"]["annotations"] == {"team/owner": "alice"}
    assert "env" not in engine(pod)


def test_forged_annotations_on_a_preconfigured_pod_are_replaced_by_signed_ones() -> None:
    """The pod already carries every setting we inject and claims injection: nothing to add
    to args/env, but the signature is ours only after admission."""
    backend = cache_backend()
    injected, _ = admit(engine_pod(*VLLM_SERVE), backend)
    forged = copy.deepcopy(injected)
    forged["metadata"]["annotations"] = dict(FORGED)
    assert not webhook.verify_injection(forged, SETTINGS)
    pod, response = admit(forged, backend)
    ops = json.loads(base64.b64decode(response["patch"]))
    assert [op["path"] for op in ops] == ["/metadata/annotations/inferencecache.io~1injected-by-signature"]
    assert webhook.verify_injection(pod, SETTINGS)
    assert not webhook.verify_injection(pod, WebhookSettings(signing_key=b"another-key"))


def test_signature_breaks_when_a_signed_setting_or_the_claim_changes() -> None:
    pod, _ = admit(engine_pod(*VLLM_SERVE), cache_backend())
    other_backend = copy.deepcopy(pod)
    other_backend["metadata"]["annotations"][ANNOTATION_INJECTED_BY] = "team-a/other"
    other_seed = copy.deepcopy(pod)
    engine(other_seed)["env"][0]["value"] = "1"
    assert not webhook.verify_injection(other_backend, SETTINGS)
    assert not webhook.verify_injection(other_seed, SETTINGS)


def test_unsigned_settings_write_no_signature_and_verify_nothing() -> None:
    unsigned = WebhookSettings()
    pod, _ = admit(engine_pod(*VLLM_SERVE), cache_backend(), unsigned)
    assert ANNOTATION_INJECTED_BY_SIGNATURE not in pod["metadata"]["annotations"]
    assert not webhook.verify_injection(pod, unsigned)


def test_data_parallel_pod_gets_one_config_and_rank_ports_match_the_subscriber() -> None:
    command, args = VLLM_SERVE
    pod, response = admit(engine_pod(command, [*args, "--data-parallel-size", "4"]), cache_backend())
    assert "warnings" not in response
    config = json.loads(flag(engine(pod), "--kv-events-config") or "")
    subscriber = EndpointConfig(
        replica_id="10.0.0.7:8000",
        model="qwen",
        kv_events=config["endpoint"].replace("*", "10.0.0.7"),
        replay=config["replay_endpoint"].replace("*", "10.0.0.7"),
        data_parallel_size=4,
    )
    ranks = subscriber.rank_endpoints()
    assert [(pub, replay) for _, pub, replay in ranks] == [
        (f"tcp://10.0.0.7:{5557 + r}", f"tcp://10.0.0.7:{5657 + r}") for r in range(4)
    ]
    ports = {p.rsplit(":", 1)[1] for _, pub, replay in ranks for p in (pub, replay or "")}
    assert len(ports) == 8


def test_data_parallel_wider_than_the_port_gap_warns() -> None:
    command, args = VLLM_SERVE
    _, response = admit(engine_pod(command, [*args, "-dp", "128"]), cache_backend())
    assert [w for w in response["warnings"] if "collide" in w]


def test_named_engine_container_is_chosen_over_the_first() -> None:
    pod, _ = admit(engine_pod(*VLLM_SERVE, sidecar_first=True), cache_backend())
    assert engine(pod, "log-shipper") == engine_pod(*VLLM_SERVE, sidecar_first=True)["spec"]["containers"][0]
    assert env(engine(pod))["PYTHONHASHSEED"] == "0"


def test_first_container_without_command_or_args_gets_args() -> None:
    unnamed = engine_pod(None, None)
    unnamed["spec"]["containers"][0]["name"] = "server"
    pod, _ = admit(unnamed, cache_backend(), WebhookSettings())
    c = engine(pod, "server")
    assert "command" not in c and c["args"][0] == "--kv-events-config"


def test_shell_command_is_not_injected() -> None:
    pod, response = admit(engine_pod(["/bin/sh", "-c", "vllm serve m"], None), cache_backend())
    assert "patch" not in response and "env" not in engine(pod)
    assert [w for w in response["warnings"] if "sh -c" in w]


def test_type_none_wires_kv_events_and_hashes_only() -> None:
    command, args = VLLM_SERVE
    pod, _ = admit(
        engine_pod(command, [*args, "--kv-transfer-config", '{"kv_connector":"Mine"}']),
        cache_backend(type="None"),
    )
    c = engine(pod)
    assert flag(c, "--kv-transfer-config") == '{"kv_connector":"Mine"}'
    assert env(c) == {"PYTHONHASHSEED": "0"} and flag(c, "--kv-events-config") is not None


def test_external_backend_uses_spec_endpoint_and_does_not_double_the_scheme() -> None:
    backend = cache_backend(type="External", endpoint=" LM://cache.example.net:8200 ")
    pod, _ = admit(engine_pod(*VLLM_SERVE), backend)
    assert env(engine(pod))["LMCACHE_REMOTE_URL"] == "lm://cache.example.net:8200"


def test_managed_backend_without_endpoint_yet_injects_kv_events_and_warns() -> None:
    backend = cache_backend()
    backend["status"] = {}
    pod, response = admit(engine_pod(*VLLM_SERVE), backend)
    assert env(engine(pod)) == {"PYTHONHASHSEED": "0"}
    assert [w for w in response["warnings"] if "no endpoint yet" in w]


def test_sglang_engine_is_skipped() -> None:
    _, response = admit(engine_pod(*VLLM_SERVE), cache_backend(integration={"engine": "SGLang"}))
    assert "patch" not in response


def test_engine_overrides_replace_suppress_and_never_touch_user_settings() -> None:
    """seed §6.4: only what the injection wrote is replaced or suppressed; the pod's own stay.
    (The validator forbids naming the reserved flags; a backend admitted before it still merges.)"""
    command, args = VLLM_SERVE
    overrides = {
        "args": [
            "--kv-transfer-config",
            '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer"}',
            "--enable-chunked-prefill",
            "--max-num-seqs=64",
            "--block-size",
            "32",
        ],
        "suppressArgs": ["--prefix-caching-hash-algo", "--port"],
        "env": [
            {"name": "LMCACHE_CHUNK_SIZE", "value": "512"},
            {"name": "HF_HOME", "value": "/override"},
            {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
        ],
        "suppressEnv": ["LMCACHE_LOCAL_CPU", "HF_HOME"],
    }
    backend = cache_backend(integration={"engine": "vllm", "engineOverrides": overrides})
    pod, response = admit(engine_pod(command, args, env=[{"name": "HF_HOME", "value": "/models"}]), backend)
    c = engine(pod)
    assert c["args"] == [
        "--port",
        "8000",
        "--block-size",
        "16",
        "--kv-events-config",
        json.dumps(KV_EVENTS, separators=(",", ":")),
        "--kv-transfer-config",
        '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer"}',
        "--enable-chunked-prefill",
        "--max-num-seqs=64",
    ]
    assert env(c) == {
        "HF_HOME": "/models",
        "PYTHONHASHSEED": "0",
        **{k: v for k, v in LMCACHE_ENV.items() if k != "LMCACHE_LOCAL_CPU"},
        "LMCACHE_CHUNK_SIZE": "512",
        "VLLM_LOGGING_LEVEL": "DEBUG",
    }
    assert response["warnings"] == [
        "inference-cache: engineOverrides.args --block-size: the pod sets it; left as is",
        "inference-cache: engineOverrides.env HF_HOME: the pod sets it; left as is",
    ]
    readmit(pod, backend)


def test_select_backend_first_by_name_with_a_non_empty_subset_selector() -> None:
    pod = engine_pod(*VLLM_SERVE)

    def cb(name: str, labels: dict[str, str], **meta: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, **meta}, "spec": {"engineSelector": {"matchLabels": labels}}}

    backends = [
        cb("d", {"app": "qwen"}),
        cb("a", {}),
        cb("b", {"app": "qwen"}, deletionTimestamp="2026-01-01T00:00:00Z"),
        cb("c", {"app": "qwen", "tier": "x"}),
        cb("e", {"app": "qwen"}),
    ]
    chosen = webhook.select_backend(pod, backends)
    assert chosen is not None and chosen["metadata"]["name"] == "d"


def test_internal_error_fails_open_with_a_warning_and_strips_our_annotations() -> None:
    broken = engine_pod(*VLLM_SERVE, annotations=dict(FORGED))
    broken["spec"]["containers"][0]["env"] = "not-a-list"
    mutation = webhook.mutate_engine_pod(broken, cache_backend(), SETTINGS)
    assert mutation.skipped_reason is not None and "internal error" in mutation.warnings[0]
    assert all(op["op"] == "remove" for op in mutation.patch) and len(mutation.patch) == 3


def test_admission_response_allows_when_mutate_raises() -> None:
    def boom(request: dict[str, Any]) -> Mutation:
        raise RuntimeError("list failed")

    out = webhook.admission_review_response(admission_review(engine_pod(*VLLM_SERVE), uid="u-1"), boom)
    assert out["response"]["uid"] == "u-1" and out["response"]["allowed"] is True
    assert "patch" not in out["response"] and "RuntimeError" in out["response"]["warnings"][0]


def test_settings_reject_unusable_values() -> None:
    for bad in (
        {"hash_algo": "builtin"},
        {"python_hash_seed": "random"},
        {"kv_events_endpoint": "tcp://0.0.0.0:5557"},
    ):
        with pytest.raises(ValueError):
            WebhookSettings(**bad)  # type: ignore[arg-type]


# -- CacheBackend defaulting and validation ------------------------------------------------------


def cb_obj(spec: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "inferencecache.io/v1alpha1",
        "kind": "CacheBackend",
        "metadata": {"name": "cb", "namespace": namespace},
        "spec": spec,
    }


def test_defaulting_fills_absent_objects_from_the_crd_and_never_overwrites() -> None:
    crd = crds.cache_backend()
    obj = cb_obj({"autoscaling": {"maxReplicas": 4}})
    defaulted = jsonpatch.apply_patch(obj, webhook.default_cache_backend(obj, crd))
    spec = defaulted["spec"]
    assert spec["integration"] == {
        "engine": "vllm",
        "role": "ReadWrite",
        "failOpen": True,
        "firstEventTimeout": "5m",
    }
    assert spec["gateway"] == {
        "mode": "None",
        "bodyMode": "Buffered",
        "messageTimeout": "60s",
        "failOpen": True,
        "responseProcessing": False,
        "targetPorts": [{"number": 8000}],
    }
    assert spec["type"] == "LMCache" and spec["replicas"] == 1
    assert spec["autoscaling"]["minReplicas"] == 1  # = the (defaulted) replicas
    assert "storage" not in spec and "template" not in spec  # no defaults / required fields
    assert webhook.default_cache_backend(defaulted, crd) == []
    assert crd_validate.validate(defaulted, crd) == []


def test_defaulting_keeps_set_values() -> None:
    crd = crds.cache_backend()
    obj = cb_obj(
        {
            "replicas": 0,
            "autoscaling": {"maxReplicas": 4},
            "integration": {"firstEventTimeout": "1m"},
            "gateway": {"mode": "EnvoyGateway", "failOpen": False, "httpRouteRef": {"name": "r"}},
        }
    )
    spec = jsonpatch.apply_patch(obj, webhook.default_cache_backend(obj, crd))["spec"]
    assert spec["integration"]["firstEventTimeout"] == "1m" and spec["integration"]["role"] == "ReadWrite"
    assert spec["gateway"]["failOpen"] is False and spec["gateway"]["mode"] == "EnvoyGateway"
    assert spec["gateway"]["messageTimeout"] == "60s" and "minReplicas" not in spec["autoscaling"]


GW = {"mode": "EnvoyGateway", "modelName": "qwen", "httpRouteRef": {"name": "llm"}}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, []),
        ({"type": "None", "gateway": dict(GW)}, []),
        ({"type": "External"}, [("Required", "spec.endpoint")]),
        ({"type": "LMCache", "endpoint": "x:1"}, [("Invalid", "spec.endpoint")]),
        ({"type": "External", "endpoint": "http://x:1"}, [("Invalid", "spec.endpoint")]),
        ({"type": "External", "endpoint": "lm://[::1]:8200"}, []),
        ({"type": "External", "endpoint": "::1:8200"}, [("Invalid", "spec.endpoint")]),
        ({"type": "External", "endpoint": "lm://x:1/path"}, [("Invalid", "spec.endpoint")]),
        (
            {"type": "External", "endpoint": "cache.other.svc.cluster.local:65432"},
            [("Forbidden", "spec.endpoint")],
        ),
        ({"type": "External", "endpoint": "cache.other.svc:65432", "allowCrossNamespace": True}, []),
        ({"type": "External", "endpoint": "cache.team-a.svc:65432"}, []),
        (
            {"type": "NIXL", "storage": {"pvc": {"size": "1Gi"}}},
            [("Forbidden", "spec.storage.pvc"), ("Invalid", "spec.integration.engine")],
        ),
        ({"replicas": 0, "autoscaling": {"maxReplicas": 2}}, [("Required", "spec.autoscaling.minReplicas")]),
        ({"integration": {"engine": "SGLang"}}, [("Invalid", "spec.integration.engine")]),
        (
            {
                "integration": {
                    "engineOverrides": {
                        "args": ["--kv-events-config={}"],
                        "suppressArgs": ["--kv-transfer-config"],
                        "env": [{"name": "PYTHONHASHSEED", "value": "1"}],
                        "suppressEnv": ["LMCACHE_REMOTE_URL"],
                    }
                }
            },
            [
                ("Forbidden", "spec.integration.engineOverrides.args[0]"),
                ("Forbidden", "spec.integration.engineOverrides.suppressArgs[0]"),
                ("Forbidden", "spec.integration.engineOverrides.env[0].name"),
                ("Forbidden", "spec.integration.engineOverrides.suppressEnv[0]"),
            ],
        ),
        (
            {
                "integration": {
                    "engineOverrides": {
                        "env": [
                            {"name": "1BAD", "value": "x"},
                            {"name": "A", "value": "x", "valueFrom": {"fieldRef": {}}},
                            {"name": "B", "valueFrom": {}},
                        ]
                    }
                }
            },
            [
                ("Invalid", "spec.integration.engineOverrides.env[0].name"),
                ("Invalid", "spec.integration.engineOverrides.env[1].valueFrom"),
                ("Invalid", "spec.integration.engineOverrides.env[2].valueFrom"),
            ],
        ),
        (
            {"gateway": {"mode": "InferencePool", "modelName": "qwen", "bodyMode": "FullDuplexStreamed"}},
            [("Invalid", "spec.gateway.failOpen")],
        ),
        (
            {
                "gateway": {
                    "mode": "InferencePool",
                    "modelName": "qwen",
                    "bodyMode": "FullDuplexStreamed",
                    "failOpen": False,
                }
            },
            [],
        ),
        ({"gateway": {"mode": "InferencePool"}}, [("Required", "spec.gateway.modelName")]),
        (
            {"gateway": {"mode": "EnvoyGateway", "modelName": "qwen"}},
            [("Required", "spec.gateway.httpRouteRef.name")],
        ),
        ({"gateway": {"mode": "None"}}, []),
    ],
)
def test_cache_backend_validation(spec: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    errors = webhook.validate_cache_backend(cb_obj(spec))
    assert [(e.type, e.field) for e in errors] == expected


def test_cache_backend_update_rejects_only_new_errors() -> None:
    old = cb_obj({"type": "External"})  # already invalid (created before the webhook)
    assert webhook.validate_cache_backend(cb_obj({"type": "External", "replicas": 3}), old) == []
    new = cb_obj({"type": "External", "gateway": {"mode": "InferencePool"}})
    assert [e.field for e in webhook.validate_cache_backend(new, old)] == ["spec.gateway.modelName"]


def test_error_message_shape() -> None:
    errors = webhook.validate_cache_backend(cb_obj({"type": "External", "endpoint": "http://x:1"}))
    message = webhook.format_errors("CacheBackend", "cb", errors)
    assert message == (
        'CacheBackend "cb" is invalid: '
        "[spec.endpoint: Invalid 'http://x:1': scheme \"http\" is not supported; use lm:// or host:port]"
    )


# -- CachePolicy and CacheTenant -----------------------------------------------------------------


def named(kind: str, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec or {}}


def test_second_cache_policy_in_a_namespace_is_denied_naming_the_first() -> None:
    existing = [named("CachePolicy", "zeta"), named("CachePolicy", "beta")]
    errors = webhook.validate_cache_policy(named("CachePolicy", "alpha"), existing)
    assert len(errors) == 1 and "already has CachePolicy 'beta'" in str(errors[0])
    assert webhook.validate_cache_policy(named("CachePolicy", "alpha"), []) == []
    # the apiserver may list the object itself (a retried create): not a conflict
    assert webhook.validate_cache_policy(named("CachePolicy", "alpha"), [named("CachePolicy", "alpha")]) == []


@pytest.mark.parametrize(
    ("ttl", "ok"),
    [("30m", True), ("1h30m", True), ("0s", False), ("0", False), ("-5m", False), ("soon", False)],
)
def test_cache_policy_eviction_ttl_must_be_positive(ttl: str, ok: bool) -> None:
    errors = webhook.validate_cache_policy(named("CachePolicy", "p", {"evictionTTL": ttl}), [])
    assert (errors == []) is ok
    if not ok:
        assert errors == [
            FieldError("Invalid", "spec.evictionTTL", "must be a positive duration (e.g. 30m)", ttl)
        ]


def test_cache_policy_update_checks_spec_only_and_only_new_errors() -> None:
    old = named("CachePolicy", "p", {"evictionTTL": "0s"})
    others = [named("CachePolicy", "q")]
    assert (
        webhook.validate_cache_policy(
            named("CachePolicy", "p", {"evictionTTL": "0s", "eviction": "LFU"}), others, old
        )
        == []
    )
    bad = webhook.validate_cache_policy(
        named("CachePolicy", "p", {"evictionTTL": "0s"}), others, named("CachePolicy", "p")
    )
    assert [e.field for e in bad] == ["spec.evictionTTL"]


def test_cache_tenant_id_unique_within_the_namespace() -> None:
    existing = [
        named("CacheTenant", "t2", {"tenantID": "acme"}),
        named("CacheTenant", "t1", {"tenantID": "acme"}),
        named("CacheTenant", "t3", {"tenantID": "other"}),
    ]
    errors = webhook.validate_cache_tenant(named("CacheTenant", "new", {"tenantID": "acme"}), existing)
    assert [(e.type, e.field) for e in errors] == [("Invalid", "spec.tenantID")] and "'t1'" in errors[
        0
    ].detail
    assert webhook.validate_cache_tenant(named("CacheTenant", "new", {"tenantID": "fresh"}), existing) == []
    # UPDATE re-checks only a changed tenantID
    same = named("CacheTenant", "t1", {"tenantID": "acme"})
    assert webhook.validate_cache_tenant(same, existing, old=same) == []
    moved = webhook.validate_cache_tenant(
        named("CacheTenant", "t3", {"tenantID": "acme"}),
        existing,
        old=named("CacheTenant", "t3", {"tenantID": "other"}),
    )
    assert "'t1'" in moved[0].detail


def test_kopf_wiring_reproduces_the_patch_through_patch_fns() -> None:
    """What the kopf ``@on.mutate`` handler does: append the ops as a patch function; kopf
    diffs the body (``Patch.as_json_patch``) into its own JSONPatch, same resulting pod."""
    pod = engine_pod(*VLLM_SERVE, annotations=dict(FORGED))
    mutation = webhook.mutate_engine_pod(pod, cache_backend(), SETTINGS)
    patch = kopf.Patch(body=kopf.Body(copy.deepcopy(pod)))
    patch.fns.append(lambda body: jsonpatch.apply_patch(body, mutation.patch, in_place=True))
    via_kopf = jsonpatch.apply_patch(pod, patch.as_json_patch())
    assert via_kopf == jsonpatch.apply_patch(pod, mutation.patch)
    assert webhook.verify_injection(via_kopf, SETTINGS)
