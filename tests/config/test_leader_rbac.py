"""The leader-election Role grants exactly what ``operator/leader.py`` does to its Lease:
``get`` and ``create``, and ``patch`` (a merge patch carrying the resourceVersion) on the
named Lease.

Owner: tests of ``config/`` (issue #7).
"""

from __future__ import annotations

from typing import Any

from inference_cache.operator import leader

from . import manifests


def test_the_leader_role_allows_what_the_elector_does(install: list[dict[str, Any]]) -> None:
    role = manifests.find(install, "Role", "inference-cache-operator-leader-election")
    granted = {
        (verb, name)
        for rule in role["rules"]
        if "coordination.k8s.io" in rule["apiGroups"] and "leases" in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or ["*"]
    }
    assert {("create", "*"), ("get", leader.LEASE_NAME), ("patch", leader.LEASE_NAME)} <= granted
