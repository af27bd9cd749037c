"""Every object of the install and its overlays validates against the Kubernetes 1.31 schemas.

Owner: tests of ``config/`` (issue #7). No kube-apiserver runs here, so the built-in kinds
(core, apps, rbac, networking, admissionregistration, autoscaling, and apiextensions for
our CRDs) go through ``kubernetes_validate`` in strict mode (unknown fields are errors).
prometheus-operator's kinds (``ServiceMonitor``, ``PrometheusRule``) go through
``crd_validate`` against the upstream CRDs vendored in ``tests/data/prometheus-operator-crds/``
(:data:`CRD_VALIDATED`; their rules' PromQL is checked in ``test_prometheus.py``). Kinds
without a schema here are listed in :data:`UNVALIDATED` and may appear only in overlays,
never in ``config/install.yaml``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

from ..operator import crd_validate
from . import manifests
from .test_prometheus import CRD_FILES

KUBERNETES_VERSION = "1.31"
VALIDATED_GROUPS = {
    "",
    "apps",
    "rbac.authorization.k8s.io",
    "networking.k8s.io",
    "admissionregistration.k8s.io",
    "autoscaling",
    "apiextensions.k8s.io",
}
#: (apiVersion, kind) -> the upstream CRD the objects of that kind are validated against.
CRD_VALIDATED = {("monitoring.coreos.com/v1", kind): path for kind, path in CRD_FILES.items()}
#: (apiVersion, kind) of the objects no schema here covers: checked only by the reviewer
#: and by the consistency tests in test_wiring.py.
UNVALIDATED = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
}


def schema_errors(obj: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}"
    return None


@pytest.mark.parametrize("folder", ["default", "overlays/cert-manager", "prometheus"])
def test_every_object_validates_or_is_listed_as_unvalidated(
    folder: str, kustomize: Callable[[str], str]
) -> None:
    errors, unvalidated = [], set()
    for obj in manifests.parse(kustomize(folder)):
        if manifests.group_of(obj) in VALIDATED_GROUPS:
            if (error := schema_errors(obj)) is not None:
                errors.append(error)
        elif (crd := CRD_VALIDATED.get((obj["apiVersion"], obj["kind"]))) is not None:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            errors += [f"{name}: {e}" for e in crd_validate.validate(obj, crd)]
        else:
            unvalidated.add((obj["apiVersion"], obj["kind"]))
    assert errors == []
    assert unvalidated <= UNVALIDATED


def test_install_yaml_is_fully_validated(install: list[dict[str, Any]]) -> None:
    assert {manifests.group_of(o) for o in install} <= VALIDATED_GROUPS
    assert [e for o in install if (e := schema_errors(o))] == []


def test_overlays_bring_exactly_the_listed_kinds(kustomize: Callable[[str], str]) -> None:
    seen = {
        (o["apiVersion"], o["kind"])
        for folder in ("overlays/cert-manager", "prometheus")
        for o in manifests.parse(kustomize(folder))
        if manifests.group_of(o) not in VALIDATED_GROUPS
    }
    assert seen == UNVALIDATED | set(CRD_VALIDATED)


def test_strict_validation_rejects_an_unknown_field(install: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(manifests.find(install, "Deployment", "inference-cache-server"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert schema_errors(deployment) is not None
