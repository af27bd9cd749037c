"""``PolicyStore.replace``: the snapshot rules of the original's ``ReplaceSnapshot``."""

from __future__ import annotations

from inference_cache.index import policy


def test_a_later_entry_for_a_namespace_or_tenant_replaces_an_earlier_one() -> None:
    store = policy.PolicyStore()
    store.replace(
        [
            policy.NamespacePolicy("a", minimum_prefix_tokens=1),
            policy.NamespacePolicy("b", minimum_prefix_tokens=2),
            policy.NamespacePolicy("a", minimum_prefix_tokens=3),
        ],
        [policy.TenantQuota("t", 10), policy.TenantQuota("u", 20), policy.TenantQuota("t", 30)],
    )
    assert store.policy("a").minimum_prefix_tokens == 3
    assert store.policy("b").minimum_prefix_tokens == 2
    assert store.quota("t") == 30
    assert store.quota("u") == 20
    assert [p.namespace for p in store.policies()] == ["a", "b"]
    assert [q.tenant_id for q in store.quotas()] == ["t", "u"]


def test_empty_keys_are_dropped_and_negative_quotas_clamp_to_zero() -> None:
    store = policy.PolicyStore()
    store.replace(
        [policy.NamespacePolicy("", minimum_prefix_tokens=5)],
        [policy.TenantQuota("", 1), policy.TenantQuota("t", -4, "Strict")],
    )
    assert store.policies() == []
    assert store.policy("") is policy.DEFAULT_POLICY
    assert store.quotas() == [policy.TenantQuota("t", 0, "Strict")]
    assert store.quota("") is None


def test_replace_drops_what_the_new_snapshot_leaves_out() -> None:
    store = policy.PolicyStore()
    store.replace([policy.NamespacePolicy("a", eviction="lfu")], [policy.TenantQuota("t", 1)])
    generation = store.generation
    store.replace([])
    assert store.generation == generation + 1
    assert store.policy("a") is policy.DEFAULT_POLICY
    assert store.quota("t") is None
