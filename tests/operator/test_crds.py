"""Our six CRDs (operator/crds.py): the committed YAML is what the generator writes, the
CRDs are valid apiextensions.k8s.io/v1 objects with structural schemas, names/scope/printer
columns are the original's, every sample validates (CEL included), defaults fill in, and
invalid custom resources are rejected with the expected message."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inference_cache.operator import crds, manifests
from inference_cache.render.spec import TemplateSpec

from . import crd_validate as cv

GENERATED = {manifests.filename(c): c for c in crds.all_crds()}
SAMPLES = sorted((cv.REPO_ROOT / "config" / "samples").glob("*.yaml"))


def _walk(node: Any, path: str = "") -> Any:
    """(path, schema node) for every schema node under an openAPIV3Schema."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}[{key}]")


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return cv.schema_of(crd, crds.VERSION)


# ---- generator and committed YAML ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_committed_crd_yaml_matches_generator(name: str) -> None:
    committed = cv.OUR_CRDS_DIR / name
    assert committed.read_text() == manifests.render(GENERATED[name]), "run `make manifests`"


def test_no_stale_crd_files() -> None:
    assert sorted(p.name for p in cv.OUR_CRDS_DIR.glob("*.yaml")) == sorted(GENERATED)


def test_manifests_main_writes_every_crd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manifests.main([str(tmp_path / "out")]) == 0
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == sorted(GENERATED)
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / n) for n in GENERATED]
    for path in written:
        assert cv.load_crd(path) == GENERATED[path.name]
    assert manifests.main([]) == 2


def test_render_is_deterministic() -> None:
    crd = crds.cache_backend()
    assert manifests.render(crd) == manifests.render(crds.cache_backend())


# ---- the CRDs as Kubernetes objects --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_crd_is_valid_apiextensions_v1(name: str) -> None:
    kubernetes_validate.validate(GENERATED[name], "1.31", strict=True)


def test_apiextensions_validation_can_fail() -> None:
    broken = copy.deepcopy(crds.cache_policy())
    broken["spec"]["scope"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_schema_is_structural(name: str) -> None:
    """Every node has a type (or is int-or-string), list-map keys are required, and every
    default is valid against its own schema, as the apiserver demands."""
    for path, node in _walk(_schema(GENERATED[name])):
        if path != ".metadata" and not node.get("x-kubernetes-int-or-string"):
            assert "type" in node, path
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", ()) or "default" in item["properties"][key], (path, key)
        if "default" in node:
            jsonschema.Draft4Validator(cv.to_json_schema(node), format_checker=cv.FORMATS).validate(
                node["default"]
            )
        for rule in node.get("x-kubernetes-validations", ()):
            assert rule["message"], (path, rule)
    assert cv.unevaluable_rules(GENERATED[name]) == {}


EXPECTED_NAMES = {
    # kind: (plural, short name, scope, printer columns)
    "CacheBackend": (
        "cachebackends",
        "cb",
        "Namespaced",
        ["Type", "Ready", "Matched", "Endpoint", "Prefixes", "LastEvent", "Gateway", "Age"],
    ),
    "CachePolicy": ("cachepolicies", "cpol", "Namespaced", ["Eviction", "Age"]),
    "CacheTenant": ("cachetenants", "ct", "Namespaced", ["Tenant", "Entries", "Quota", "Isolation", "Age"]),
    "PromptTemplate": ("prompttemplates", "pt", "Namespaced", ["Revision", "Age"]),
    "PDTopology": ("pdtopologies", "pdt", "Namespaced", ["Prefill", "Decode", "Age"]),
    "CacheIndex": ("cacheindices", "ci", "Cluster", ["Prefixes", "Changed", "Age"]),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_names_scope_columns_and_status_subresource(kind: str, our_crds: dict[str, dict[str, Any]]) -> None:
    crd = our_crds[kind]
    plural, short, scope, columns = EXPECTED_NAMES[kind]
    assert crd["metadata"]["name"] == f"{plural}.inferencecache.io"
    assert crd["spec"]["names"]["plural"] == plural
    assert crd["spec"]["names"]["shortNames"] == [short]
    assert crd["spec"]["scope"] == scope
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == columns


def test_cachebackend_printer_column_paths(our_crds: dict[str, dict[str, Any]]) -> None:
    cols = {c["name"]: c for c in our_crds["CacheBackend"]["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert cols["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert (cols["Matched"]["type"], cols["LastEvent"]["type"]) == ("integer", "date")
    assert cols["Prefixes"]["jsonPath"] == ".status.indexParticipation.prefixCount"


# ---- samples -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_validates(path: Path, our_crds: dict[str, dict[str, Any]]) -> None:
    obj = yaml.safe_load(path.read_text())
    assert obj["apiVersion"] == crds.API_VERSION
    assert cv.validate(obj, our_crds[obj["kind"]]) == []


def test_samples_cover_every_kind_and_gateway_mode(samples: dict[str, dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in samples.values()}
    assert kinds >= {"CacheBackend", "CachePolicy", "CacheTenant", "PromptTemplate", "PDTopology"}
    backends = [o["spec"] for o in samples.values() if o["kind"] == "CacheBackend"]
    routing_modes = {b["gateway"]["mode"] for b in backends if b.get("type") == "None"}
    assert routing_modes == {"None", "InferencePool", "EnvoyGateway"}
    assert any(b.get("type", "LMCache") == "LMCache" for b in backends)


def test_prompttemplate_sample_is_a_renderable_template(
    samples: dict[str, dict[str, Any]], our_crds: dict[str, dict[str, Any]]
) -> None:
    obj = samples["cache_v1alpha1_prompttemplate.yaml"]
    spec = TemplateSpec.from_dict(obj["spec"])
    assert {s.type.value for s in spec.slots} == {"Stable", "Mutable"}
    stored = cv.defaulted(obj, our_crds["PromptTemplate"])
    assert TemplateSpec.from_dict(stored["spec"]) == spec


# ---- defaults ------------------------------------------------------------------------------


def _cr(kind: str, spec: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": crds.API_VERSION, "kind": kind, "metadata": {"name": "x"}, **extra}
    if spec is not None:
        obj["spec"] = spec
    return obj


def test_cachebackend_defaults(our_crds: dict[str, dict[str, Any]]) -> None:
    spec = cv.defaulted(_cr("CacheBackend", {"integration": {}, "gateway": {}}), our_crds["CacheBackend"])[
        "spec"
    ]
    assert spec == {
        "type": "LMCache",
        "deploymentKind": "Deployment",
        "replicas": 1,
        "allowCrossNamespace": False,
        "integration": {"engine": "vllm", "role": "ReadWrite", "failOpen": True, "firstEventTimeout": "5m"},
        "gateway": {
            "mode": "None",
            "bodyMode": "Buffered",
            "messageTimeout": "60s",
            "failOpen": True,
            "responseProcessing": False,
            "targetPorts": [{"number": 8000}],
        },
    }


def test_cachepolicy_tenant_template_defaults(our_crds: dict[str, dict[str, Any]]) -> None:
    policy = cv.defaulted(_cr("CachePolicy", {"strategy": {}}), our_crds["CachePolicy"])["spec"]
    assert policy == {
        "eviction": "LRU",
        "minimumMatchedTokens": 64,
        "routingFloorScore": "0.1",
        "affinityRouting": "Enabled",
        "strategy": {"enableChainMatching": True, "requireChain": False, "enableTenantHot": True},
    }
    tenant = cv.defaulted(_cr("CacheTenant", {"tenantID": "a"}), our_crds["CacheTenant"])["spec"]
    assert tenant == {"tenantID": "a", "isolationMode": "Fairness"}
    template = cv.defaulted(_cr("PromptTemplate", {"body": "x"}), our_crds["PromptTemplate"])["spec"]
    assert template == {"body": "x", "normalization": "none"}


# ---- invalid custom resources --------------------------------------------------------------

GW = {"mode": "EnvoyGateway", "httpRouteRef": {"name": "r"}}
FAIL_OPEN = crds.FAIL_OPEN_STREAMED_MESSAGE

INVALID = [
    # (kind, spec, expected error substring)
    ("CacheBackend", {"gateway": {**GW, "bodyMode": "FullDuplexStreamed"}}, FAIL_OPEN),
    ("CacheBackend", {"gateway": {**GW, "bodyMode": "FullDuplexStreamed", "failOpen": True}}, FAIL_OPEN),
    ("CacheBackend", {"gateway": {"mode": "None", "bodyMode": "FullDuplexStreamed"}}, FAIL_OPEN),
    ("CacheBackend", {"gateway": {"mode": "EnvoyGateway"}}, crds.HTTPROUTE_REQUIRED_MESSAGE),
    ("CacheBackend", {"gateway": {"mode": "Istio"}}, "'Istio' is not one of"),
    ("CacheBackend", {"gateway": {"bodyMode": "Streamed"}}, "'Streamed' is not one of"),
    ("CacheBackend", {"gateway": {"messageTimeout": "1 minute"}}, "does not match"),
    ("CacheBackend", {"gateway": {"targetPorts": []}}, "should be non-empty"),
    ("CacheBackend", {"gateway": {"targetPorts": [{"number": 0}]}}, "less than the minimum of 1"),
    ("CacheBackend", {"gateway": {"targetPorts": [{"number": 65536}]}}, "greater than the maximum of 65535"),
    ("CacheBackend", {"gateway": {"targetPorts": [{"number": 8000}, {"number": 8000}]}}, "Duplicate value"),
    ("CacheBackend", {"gateway": {"targetPorts": [{"number": 8000 + i} for i in range(9)]}}, "is too long"),
    ("CacheBackend", {"gateway": {"httpRouteRef": {}}}, "'name' is a required property"),
    ("CacheBackend", {"gateway": {"responseProcessing": "yes"}}, "is not of type 'boolean'"),
    ("CacheBackend", {"replicas": -1}, "less than the minimum of 0"),
    ("CacheBackend", {"replicas": 2**31}, "is not a 'int32'"),
    ("CacheBackend", {"deploymentKind": "DaemonSet"}, "'DaemonSet' is not one of"),
    (
        "CacheBackend",
        {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
        "minReplicas must not exceed maxReplicas",
    ),
    ("CacheBackend", {"autoscaling": {"minReplicas": 1}}, "'maxReplicas' is a required property"),
    ("CacheBackend", {"autoscaling": {"maxReplicas": 0}}, "less than the minimum of 1"),
    (
        "CacheBackend",
        {"autoscaling": {"maxReplicas": 2, "targetCPUUtilizationPercent": 101}},
        "maximum of 100",
    ),
    ("CacheBackend", {"integration": {"role": "Admin"}}, "'Admin' is not one of"),
    ("CacheBackend", {"storage": {"pvc": {}}}, "'size' is a required property"),
    ("CacheBackend", {"storage": {"pvc": {"size": "ten gigs"}}}, "does not match"),
    ("CacheBackend", {"engineSelector": {"matchLabels": {"app": 1}}}, "is not of type 'string'"),
    ("CacheBackend", {"template": {"terminationGracePeriodSeconds": -1}}, "less than the minimum of 0"),
    ("CacheBackend", {"bogus": True}, "Additional properties are not allowed ('bogus' was unexpected)"),
    ("CachePolicy", None, "'spec' is a required property"),
    ("CachePolicy", {"eviction": "FIFO"}, "'FIFO' is not one of"),
    ("CachePolicy", {"minimumMatchedTokens": -1}, "less than the minimum of 0"),
    ("CachePolicy", {"minimumPrefixTokens": -1}, "less than the minimum of 0"),
    ("CachePolicy", {"lookupTimeoutMs": -1}, "less than the minimum of 0"),
    ("CachePolicy", {"routingFloorScore": "-1"}, "does not match"),
    ("CachePolicy", {"routingFloorScore": "0.1234567"}, "does not match"),
    ("CachePolicy", {"routingFloorScore": 0.1}, "is not of type 'string'"),
    ("CachePolicy", {"affinityRouting": "On"}, "'On' is not one of"),
    ("CachePolicy", {"strategy": {"requireChain": "no"}}, "is not of type 'boolean'"),
    ("CacheTenant", None, "'spec' is a required property"),
    ("CacheTenant", {}, "'tenantID' is a required property"),
    ("CacheTenant", {"tenantID": ""}, "should be non-empty"),
    ("CacheTenant", {"tenantID": "a", "quota": {"maxIndexEntries": -1}}, "less than the minimum of 0"),
    ("CacheTenant", {"tenantID": "a", "isolationMode": "Strict"}, "'Strict' is not one of"),
    ("CacheTenant", {"tenantID": "a", "crypto": {"key": "x"}}, "is expected to be empty"),
    ("PromptTemplate", {}, crds.BODY_XOR_MESSAGES_MESSAGE),
    (
        "PromptTemplate",
        {"body": "x", "messages": [{"role": "user", "body": "y"}]},
        crds.BODY_XOR_MESSAGES_MESSAGE,
    ),
    ("PromptTemplate", {"body": ""}, "should be non-empty"),
    ("PromptTemplate", {"messages": []}, "should be non-empty"),
    ("PromptTemplate", {"messages": [{"role": "tool", "body": "y"}]}, "'tool' is not one of"),
    ("PromptTemplate", {"body": "x", "slots": [{"name": "a"}]}, "'type' is a required property"),
    ("PromptTemplate", {"body": "x", "slots": [{"name": "a", "type": "Fixed"}]}, "'Fixed' is not one of"),
    ("PromptTemplate", {"body": "x", "slots": [{"name": "1a", "type": "Stable"}]}, "does not match"),
    (
        "PromptTemplate",
        {"body": "x", "slots": [{"name": "a", "type": "Stable"}, {"name": "a", "type": "Mutable"}]},
        "Duplicate value",
    ),
    (
        "PromptTemplate",
        {"body": "x", "slots": [{"name": "a", "type": "Stable", "maxLength": 0}]},
        "minimum of 1",
    ),
    ("PromptTemplate", {"body": "x", "normalization": "lower"}, "'lower' is not one of"),
    ("PromptTemplate", {"body": "x", "allowedNamespaces": ["Team_A"]}, "does not match"),
    ("PromptTemplate", {"body": "x", "allowedNamespaces": ["a", "a"]}, "Duplicate value"),
    ("PDTopology", {"prefillPools": [{"name": ""}]}, "should be non-empty"),
    ("PDTopology", {"decodePools": [{"name": "d", "replicas": -1}]}, "less than the minimum of 0"),
    ("PDTopology", {"decodePools": [{"name": "d"}, {"name": "d"}]}, "Duplicate value"),
    ("PDTopology", {"acceleratorTypes": [{"vendor": "nvidia"}]}, "'name' is a required property"),
    ("CacheIndex", {"replicas": 1}, "Additional properties are not allowed ('replicas' was unexpected)"),
]


@pytest.mark.parametrize(("kind", "spec", "message"), INVALID)
def test_invalid_custom_resource_is_rejected(
    kind: str, spec: dict[str, Any] | None, message: str, our_crds: dict[str, dict[str, Any]]
) -> None:
    errors = cv.validate(_cr(kind, spec), our_crds[kind])
    assert any(message in e for e in errors), errors


VALID = [
    ("CacheBackend", {}),
    (
        "CacheBackend",
        {"type": "None", "gateway": {**GW, "bodyMode": "FullDuplexStreamed", "failOpen": False}},
    ),
    ("CacheBackend", {"type": "External", "endpoint": "lm://cache.example:8200"}),
    ("CacheBackend", {"storage": {"pvc": {"size": "10Gi", "storageClassName": "fast"}}}),
    ("CacheBackend", {"autoscaling": {"maxReplicas": 2}, "replicas": 0}),
    (
        "CacheBackend",
        {"gateway": {"mode": "InferencePool", "targetPorts": [{"number": 8000}, {"number": 8001}]}},
    ),
    ("CacheBackend", {"integration": {"engineOverrides": {"env": [{"name": "A", "valueFrom": {"x": {}}}]}}}),
    ("CachePolicy", {}),
    ("CachePolicy", {"routingFloorScore": "0", "minimumMatchedTokens": 0, "affinityRouting": "Disabled"}),
    ("CacheTenant", {"tenantID": "a", "quota": {"maxIndexEntries": 0}, "crypto": {}}),
    (
        "PromptTemplate",
        {"messages": [{"role": "system", "body": "{{.s}}"}], "slots": [{"name": "s", "type": "Stable"}]},
    ),
    ("PDTopology", {}),
    ("CacheIndex", None),
    ("CacheIndex", {}),
]


@pytest.mark.parametrize(("kind", "spec"), VALID)
def test_valid_custom_resource_is_accepted(
    kind: str, spec: dict[str, Any] | None, our_crds: dict[str, dict[str, Any]]
) -> None:
    assert cv.validate(_cr(kind, spec), our_crds[kind]) == []


def test_cacheindex_is_cluster_scoped_with_snapshot_status(our_crds: dict[str, dict[str, Any]]) -> None:
    status = {
        "replicas": [
            {
                "id": "10.0.0.7:8000",
                "tenant": "team-a",
                "cacheMemoryBytes": 1024,
                "hitRate": "0.78",
                "pressure": "0.1",
                "lastUpdate": "2026-01-01T00:00:00Z",
            }
        ],
        "tenants": [{"id": "", "indexEntries": 3, "memoryUsed": 1024, "hitRate": "0.5"}],
        "prefixes": {"summary": {"total": 3, "hot": 0}},
        "observedServer": "http://inference-cache:8081/snapshot",
        "lastUpdated": "2026-01-01T00:00:00Z",
    }
    index = _cr("CacheIndex", {}, status=status)
    index["metadata"]["name"] = "cluster-default"
    assert cv.validate(index, our_crds["CacheIndex"]) == []
    namespaced = copy.deepcopy(index)
    namespaced["metadata"]["namespace"] = "default"
    assert cv.validate(namespaced, our_crds["CacheIndex"]) == [
        "metadata.namespace: a cluster-scoped object has no namespace"
    ]


def test_cachebackend_status_gateway_lists(our_crds: dict[str, dict[str, Any]]) -> None:
    status = {
        "gateway": {
            "emitted": [{"kind": "EnvoyExtensionPolicy", "name": "x"}],
            "skipped": [{"kind": "BackendTrafficPolicy", "reason": "CRD not installed"}],
        },
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Available",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "indexParticipation": {"prefixCount": 0},
    }
    assert cv.validate(_cr("CacheBackend", {}, status=status), our_crds["CacheBackend"]) == []
    bad = copy.deepcopy(status)
    bad["gateway"]["skipped"] = [{"kind": "X"}]
    assert any(
        "'reason' is a required property" in e
        for e in cv.validate(_cr("CacheBackend", {}, status=bad), our_crds["CacheBackend"])
    )


def _field_paths(node: dict[str, Any], path: str) -> Any:
    for key, sub in node.get("properties", {}).items():
        here = f"{path}.{key}"
        yield here
        if key == "conditions":
            continue
        yield from _field_paths(sub, here)
        if isinstance(sub.get("items"), dict):
            yield from _field_paths(sub["items"], f"{here}[]")


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_docs_reference_every_field(name: str) -> None:
    docs = (cv.REPO_ROOT / "docs" / "crds.md").read_text()
    schema = _schema(GENERATED[name])
    missing = [
        p
        for part in ("spec", "status")
        for p in _field_paths(schema["properties"][part], part)
        if f"| `{p}` |" not in docs
    ]
    assert missing == [], "add them to docs/crds.md"
