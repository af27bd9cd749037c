"""Pure ranking math of the cache-state index (the seed's ``pkg/index`` ranker, HEAD additions).

Owner: ``inference_cache.index``. ``index.store`` gathers candidates under the index and
calls these functions to score and order them; nothing here touches index state, so every
factor is unit-testable with the seed inventory's worked numbers (§4.6, §7.2 d-f).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from inference_cache.index import types


def freshness(age_s: float, ttl_s: float) -> float:
    """``1 - age/ttl`` clamped to [0, 1]; a non-positive age (clock skew) counts as fresh."""
    if ttl_s <= 0:
        return 0.0
    if age_s <= 0:
        return 1.0
    if age_s >= ttl_s:
        return 0.0
    return 1.0 - age_s / ttl_s


def pressure_factor(pressure: float, weight: float) -> float:
    """``clamp01(1 - weight * pressure)``."""
    f = 1.0 - weight * pressure
    return 0.0 if f < 0 else 1.0 if f > 1 else f


def slo_coef(ttft_ms: int, tight_ttft_ms: int, tight_bias: float) -> float:
    """The freshness bias of a tight TTFT budget (``0 < ttft < tight``), else 0."""
    if tight_ttft_ms > 0 and tight_bias > 0 and 0 < ttft_ms < tight_ttft_ms:
        return tight_bias
    return 0.0


def distinguishing_power(matching: int, total: int) -> float:
    """§7.2(d): how much a hit tells replicas apart (1 = unique holder, 0 = everyone has it)."""
    if total <= 1 or matching < 0:
        return 1.0
    if matching >= total:
        return 0.0
    return 1.0 - matching / total


def chain_dp_factors(matched_tokens: Sequence[int], total: int) -> list[float]:
    """Per-candidate dp factor on the chain path: a candidate's ``matching`` is the number of
    candidates that matched at least as many tokens as it did."""
    ordered = sorted(matched_tokens)
    n = len(ordered)
    return [distinguishing_power(n - bisect.bisect_left(ordered, m), total) for m in matched_tokens]


def sort_scores(scores: list[types.ReplicaScore]) -> list[types.ReplicaScore]:
    """Score descending, then replica id ascending (every path, no top-K)."""
    scores.sort(key=lambda s: (-s.score, s.replica_id))
    return scores


def effective_prefix_tokens(req: types.LookupRequest) -> int:
    """``sum(block_token_counts)`` when the chain carries counts, else ``token_count``."""
    if req.block_token_counts:
        return sum(req.block_token_counts)
    return req.token_count


def affinity_seed(block_hashes: Sequence[bytes], prefix_hash: bytes) -> bytes:
    """§7.2(f): ``be_u32(len) ++ bytes`` per block hash, else the exact prefix hash bytes."""
    if block_hashes:
        return b"".join(len(h).to_bytes(4, "big") + h for h in block_hashes)
    return prefix_hash


def affinity_pick(seed: bytes, replicas: Sequence[str]) -> str:
    """Consistent pick: ``sorted(replicas)[be_u64(sha256(seed)[:8]) % len]``."""
    ordered = sorted(replicas)
    n = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big")
    return ordered[n % len(ordered)]
