"""Fixtures for the ``config/`` tests: the pinned kubectl and kustomize renderings.

Owner: tests of ``config/`` (issue #7). ``hack/kubectl.py`` provides kubectl 1.35 (kustomize
v5) in ``.tools/kubectl/`` (``make kubectl`` runs it before the tests; here it only checks
the binary's digest and ``kubectl version --client`` when it is already there).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import manifests


@pytest.fixture(scope="session")
def kubectl() -> Path:
    out = subprocess.run(
        [sys.executable, str(manifests.REPO / "hack" / "kubectl.py")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return Path(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def kustomize(kubectl: Path) -> Callable[[str], str]:
    """``kubectl kustomize config/<folder>``: the rendered YAML text (cached per folder)."""
    cache: dict[str, str] = {}

    def build(folder: str) -> str:
        if folder not in cache:
            cache[folder] = subprocess.run(
                [str(kubectl), "kustomize", str(manifests.CONFIG / folder)],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        return cache[folder]

    return build


@pytest.fixture(scope="session")
def install() -> list[dict[str, Any]]:
    """The committed ``config/install.yaml``, parsed."""
    return manifests.parse((manifests.CONFIG / "install.yaml").read_text())
