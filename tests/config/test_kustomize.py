"""``config/install.yaml`` is exactly ``kubectl kustomize config/default``; the overlays build.

Owner: tests of ``config/`` (issue #7). ``make manifests`` rewrites install.yaml.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import manifests

PLURALS = [
    "cachebackends",
    "cachepolicies",
    "cachetenants",
    "prompttemplates",
    "pdtopologies",
    "cacheindices",
]


def test_pinned_kubectl_has_kustomize_v5(kubectl: Path) -> None:
    out = subprocess.run(
        [str(kubectl), "version", "--client"], check=True, capture_output=True, text=True
    ).stdout
    assert "Client Version: v1.35.2" in out
    assert "Kustomize Version: v5." in out


def test_install_yaml_is_the_rendering_of_config_default(kustomize: Callable[[str], str]) -> None:
    committed = (manifests.CONFIG / "install.yaml").read_text()
    assert kustomize("default") == committed, "config/install.yaml is stale: run 'make manifests'"


def test_crd_kustomization_lists_the_six_generated_crds() -> None:
    (kustomization,) = manifests.parse((manifests.CONFIG / "crd" / "kustomization.yaml").read_text())
    files = [f"bases/inferencecache.io_{plural}.yaml" for plural in PLURALS]
    assert kustomization["resources"] == files
    for name in files:
        assert (manifests.CONFIG / "crd" / name).is_file(), name


def test_install_yaml_has_our_six_crds(install: list[dict[str, Any]]) -> None:
    crds = {o["metadata"]["name"] for o in manifests.of_kind(install, "CustomResourceDefinition")}
    assert crds == {f"{plural}.inferencecache.io" for plural in PLURALS}


@pytest.mark.parametrize("folder", ["overlays/cert-manager", "prometheus"])
def test_overlay_builds_on_the_default_install(
    folder: str, kustomize: Callable[[str], str], install: list[dict[str, Any]]
) -> None:
    def keys(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in objs}

    assert keys(install) < keys(manifests.parse(kustomize(folder)))
