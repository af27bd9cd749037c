"""Speculative prefix entries: a decision's blocks count as cached on the chosen replica for
a short TTL, before that engine's KV events confirm them.

Owner: ``inference_cache.extproc`` (the picker); pure, clock injected. After llm-d's
``speculativeIndexing`` (``speculativeTTL`` 2 s, ``anchors.md`` §2.2). Without it a burst
of one new prefix would spread over the replicas (each request sees no match yet), and
each replica would prefill the same prefix. Place in the flow::

    decision --record(scope, chosen, keys, tokens_per_block)--> live entries (now + ttl_s)
    next request --match(scope, keys)--> leading blocks per replica
        --> the picker takes per replica max(index match, this match)

Entries are ``(scope_key, block key, replica)`` triples, at most ``max_entries``; the
oldest go first when full (a prompt's keys are recorded last-block first, so its first
block goes last). A refresh (the same triple recorded again) extends its life. Expired
entries never match and are dropped lazily by ``record`` and by ``sweep()``.

``keys`` are a prefix chain (``index.fingerprint.chain_keys``: a key stands for its whole
prefix). A replica's live keys are then always a union of prefixes (a prefix is recorded
whole; its tail is older in the order than its head), so its leading run is found by
binary search: O(replicas x log(blocks)) per match.

``scope_key`` is any hashable (the picker passes the index's ``types.Scope``); each call
hashes it once. Not thread-safe: the picker runs on one event loop.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

Clock = Callable[[], float]

#: block key -> replica -> (expires at, tokens per block)
_Holders = dict[bytes, dict[str, tuple[float, int]]]


class SpeculativeIndex:
    def __init__(self, *, ttl_s: float = 2.0, clock: Clock, max_entries: int = 1_000_000) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._scopes: dict[Hashable, _Holders] = {}
        #: (scope_key, block key, replica), least recently recorded (first to expire) first.
        self._order: OrderedDict[tuple[Hashable, bytes, str], None] = OrderedDict()

    @property
    def size(self) -> int:
        """Entries held (expired ones included until dropped)."""
        return len(self._order)

    def record(
        self, scope_key: Hashable, replica_id: str, keys: Sequence[bytes], tokens_per_block: int
    ) -> None:
        """``replica_id`` was chosen for a prompt with ``keys`` (``tokens_per_block`` each)."""
        now = self._clock()
        self._expire(now)
        holders = self._scopes.get(scope_key)
        if holders is None:
            holders = self._scopes[scope_key] = {}
        entry = (now + self.ttl_s, tokens_per_block)
        order = self._order
        for key in reversed(keys):
            triple = (scope_key, key, replica_id)
            if triple in order:
                order.move_to_end(triple)
            else:
                order[triple] = None
            holders.setdefault(key, {})[replica_id] = entry
        while len(order) > self.max_entries:
            self._drop(next(iter(order)))

    def match(self, scope_key: Hashable, keys: Sequence[bytes]) -> dict[str, int]:
        """Leading matched blocks per replica among live entries (only those with >= 1)."""
        return {rid: blocks for rid, (blocks, _tokens) in self._walk(scope_key, keys).items()}

    def match_tokens(self, scope_key: Hashable, keys: Sequence[bytes]) -> dict[str, int]:
        """Like :meth:`match`, in tokens: matched blocks x the ``tokens_per_block`` recorded."""
        return {rid: tokens for rid, (_blocks, tokens) in self._walk(scope_key, keys).items()}

    def sweep(self) -> int:
        """Drop every expired entry now; returns how many were dropped."""
        before = len(self._order)
        self._expire(self._clock())
        return before - len(self._order)

    def _walk(self, scope_key: Hashable, keys: Sequence[bytes]) -> dict[str, tuple[int, int]]:
        holders = self._scopes.get(scope_key)
        first = holders.get(keys[0]) if holders and keys else None
        if holders is None or first is None:
            return {}
        now = self._clock()
        out: dict[str, tuple[int, int]] = {}
        for rid, (expires, per_block) in first.items():
            if expires <= now:
                continue

            def missing(i: int, rid: str = rid) -> bool:
                entry = holders.get(keys[i], {}).get(rid)
                return entry is None or entry[0] <= now

            blocks = bisect.bisect_left(range(len(keys)), True, key=missing)
            out[rid] = (blocks, blocks * per_block)
        return out

    def _expire(self, now: float) -> None:
        order = self._order
        while order:
            scope_key, key, rid = triple = next(iter(order))
            if self._scopes[scope_key][key][rid][0] > now:
                break
            self._drop(triple)

    def _drop(self, triple: tuple[Hashable, bytes, str]) -> None:
        del self._order[triple]
        scope_key, key, rid = triple
        holders = self._scopes[scope_key]
        held = holders[key]
        del held[rid]
        if not held:
            del holders[key]
            if not holders:
                del self._scopes[scope_key]
