"""Helpers for the ``config/`` tests: where the manifests are, parsing and lookup.

Owner: tests of ``config/`` (issue #7).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
NAMESPACE = "inference-cache-system"
OPERATOR_SA = f"system:serviceaccount:{NAMESPACE}:inference-cache-operator"


def parse(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``text``."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(objs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name``."""
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def of_kind(objs: Iterable[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (o for o in objs if o["kind"] == kind)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    """The Deployment's only container."""
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def group_of(obj: dict[str, Any]) -> str:
    """The API group of ``obj`` (``""`` for core)."""
    api_version: str = obj["apiVersion"]
    return api_version.rpartition("/")[0]
