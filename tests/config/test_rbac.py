"""Least privilege: every grant of the install, listed exactly, and nothing else.

Owner: tests of ``config/`` (issue #7). A new grant must be added both in ``config/rbac``
and here, with a reason there.
"""

from __future__ import annotations

from typing import Any

from . import manifests

CRUD = ("get", "list", "watch", "create", "update", "patch", "delete")
OURS = ("cachebackends", "cachepolicies", "cachetenants", "prompttemplates", "pdtopologies", "cacheindices")

Grant = tuple[str, str, str, tuple[str, ...], str]  # role, apiGroup, resource, resourceNames, verb


def grants(
    role: str, group: str, resources: tuple[str, ...], verbs: tuple[str, ...], names: tuple[str, ...] = ()
) -> set[Grant]:
    return {(role, group, r, names, v) for r in resources for v in verbs}


OPERATOR = "ClusterRole/inference-cache-operator"
LEADER = "Role/inference-cache-operator-leader-election"
SERVER = "ClusterRole/inference-cache-server"

EXPECTED: set[Grant] = (
    grants(OPERATOR, "inferencecache.io", OURS, ("get", "list", "watch", "patch", "update"))
    | grants(OPERATOR, "inferencecache.io", ("cacheindices",), ("create",))
    | grants(OPERATOR, "inferencecache.io", tuple(f"{r}/status" for r in OURS), ("get", "patch", "update"))
    | grants(OPERATOR, "", ("pods",), ("get", "list", "watch"))
    | grants(OPERATOR, "", ("events",), ("create", "patch"))
    | grants(OPERATOR, "", ("services",), CRUD)
    | grants(OPERATOR, "apps", ("deployments",), CRUD)
    | grants(OPERATOR, "autoscaling", ("horizontalpodautoscalers",), CRUD)
    | grants(OPERATOR, "inference.networking.k8s.io", ("inferencepools",), CRUD)
    | grants(OPERATOR, "gateway.envoyproxy.io", ("envoyextensionpolicies", "backendtrafficpolicies"), CRUD)
    | grants(OPERATOR, "gateway.networking.k8s.io", ("httproutes",), ("get",))
    | grants(OPERATOR, "apiextensions.k8s.io", ("customresourcedefinitions",), ("get", "list"))
    | grants(
        OPERATOR,
        "admissionregistration.k8s.io",
        ("mutatingwebhookconfigurations",),
        ("get", "patch"),
        ("inference-cache-mutating-webhook",),
    )
    | grants(
        OPERATOR,
        "admissionregistration.k8s.io",
        ("validatingwebhookconfigurations",),
        ("get", "patch"),
        ("inference-cache-validating-webhook",),
    )
    | grants(LEADER, "coordination.k8s.io", ("leases",), ("create",))
    | grants(
        LEADER, "coordination.k8s.io", ("leases",), ("get", "patch"), ("inference-cache-operator-leader",)
    )
    | grants(SERVER, "authentication.k8s.io", ("tokenreviews",), ("create",))
    | grants(SERVER, "", ("pods",), ("list", "watch"))
    | grants(SERVER, "inference.networking.k8s.io", ("inferencepools",), ("list", "watch"))
    | grants(SERVER, "inferencecache.io", ("cachebackends",), ("list", "watch"))
)


def granted(objs: list[dict[str, Any]]) -> set[Grant]:
    out: set[Grant] = set()
    for role in objs:
        if role["kind"] not in ("Role", "ClusterRole"):
            continue
        key = f"{role['kind']}/{role['metadata']['name']}"
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule, key
            names = tuple(rule.get("resourceNames", ()))
            out |= {
                (key, group, resource, names, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    return out


def test_no_wildcards(install: list[dict[str, Any]]) -> None:
    for role, group, resource, _, verb in granted(install):
        assert "*" not in (group, resource, verb), role


def test_exactly_the_listed_grants(install: list[dict[str, Any]]) -> None:
    got = granted(install)
    assert got - EXPECTED == set(), "granted but not listed"
    assert EXPECTED - got == set(), "listed but not granted"


def test_the_server_cannot_write_anything_but_tokenreviews(install: list[dict[str, Any]]) -> None:
    writes = {g for g in granted(install) if g[0] == SERVER and g[4] not in ("get", "list", "watch")}
    assert writes == {(SERVER, "authentication.k8s.io", "tokenreviews", (), "create")}


def test_the_operator_never_writes_pods_or_secrets(install: list[dict[str, Any]]) -> None:
    for _, _, resource, _, verb in granted(install):
        assert resource != "secrets"
        assert resource != "pods" or verb in ("get", "list", "watch")


def test_each_role_is_bound_to_its_own_service_account_only(install: list[dict[str, Any]]) -> None:
    bound = {
        (f"{b['roleRef']['kind']}/{b['roleRef']['name']}", s["kind"], s["name"], s["namespace"])
        for b in install
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for s in b["subjects"]
    }
    ns = manifests.NAMESPACE
    assert bound == {
        (OPERATOR, "ServiceAccount", "inference-cache-operator", ns),
        (LEADER, "ServiceAccount", "inference-cache-operator", ns),
        (SERVER, "ServiceAccount", "inference-cache-server", ns),
    }
    assert (
        manifests.find(install, "RoleBinding", "inference-cache-operator-leader-election")["metadata"][
            "namespace"
        ]
        == ns
    )
