"""Shared fixtures of the operator tests (issue #7): our CRDs as committed in
``config/crd/bases/`` keyed by kind, and the samples in ``config/samples/``. Validate objects
with ``from . import crd_validate`` (``crd_validate.validate(obj, crd)``,
``crd_validate.crd_for(obj)``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kmock
import kubernetes.client as k8s
import pytest
import yaml

from . import crd_validate

SAMPLES_DIR = crd_validate.REPO_ROOT / "config" / "samples"


@pytest.fixture(scope="session")
def our_crds() -> dict[str, dict[str, Any]]:
    """kind -> our committed CRD."""
    crds = [crd_validate.load_crd(p) for p in sorted(crd_validate.OUR_CRDS_DIR.glob("*.yaml"))]
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


@pytest.fixture(scope="session")
def samples() -> dict[str, dict[str, Any]]:
    """sample file name -> the object it holds."""
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(SAMPLES_DIR.glob("*.yaml"))}


@pytest.fixture
def api(kmock: kmock.RawHandler) -> Iterator[k8s.ApiClient]:
    """A kubernetes client talking to the kmock API server of the test (no retries)."""
    cfg = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    cfg.retries = 0
    with k8s.ApiClient(cfg) as client:
        yield client
