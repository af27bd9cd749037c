"""Speculative prefix entries: a decision's blocks count as cached on the chosen replica for
a short TTL, before that engine's KV events confirm them.

Owner: ``inference_cache.extproc`` (the picker); pure, clock injected. After llm-d's
``speculativeIndexing`` (``speculativeTTL`` 2 s, ``anchors.md`` §2.2). Without it a burst
of one new prefix would spread over the replicas (each request sees no match yet), and
each replica would prefill the same prefix. Place in the flow::

    decision --record(scope, chosen, keys, tokens_per_block, start=index match)--> live entries
    next request --match(scope, keys, after=index match per replica)--> leading blocks per replica
        --> the picker takes per replica max(index match, this match)

Entries are ``(scope_key, block key, replica)`` triples, at most ``max_entries``; the
oldest recordings go first when full. A refresh (the same triple recorded again) extends
its life. Expired entries never match and are dropped lazily by ``record`` and by
``sweep()``. Bookkeeping is per ``record`` call, not per block: one queue item per
recording (expiry times only grow: the TTL is fixed), and an entry is dropped with its
recording only if no later recording refreshed it. So a decision costs one dict
assignment per recorded block (``docs/benchmarks.md``).

``keys`` are a prefix chain (``index.fingerprint.chain_keys``: a key stands for its whole
prefix). The picker records only the blocks past the KV index's own match for the chosen
replica (``start``: the index already holds the rest, so a follow-up turn over an 8k-token
prompt records its few new blocks, not all 500) and matches with ``after``: the blocks the
index matched per replica. A replica's run then starts at ``after[replica]`` (0 when the
index has none) and continues block by block over live entries; the count returned is the
whole run, index blocks included, so the picker's ``max(index, speculative)`` is right.
The walk is linear in the blocks past the index's match (recorded suffixes need not form
prefixes, so a binary search would be unsound): a few blocks on a follow-up, the whole
prompt only in a burst of a prefix no engine has confirmed yet.

``scope_key`` is any hashable (the picker passes the index's ``types.Scope``); each call
hashes it once. Not thread-safe: the picker runs on one event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence

Clock = Callable[[], float]
#: Expired recordings ``record`` drops per call (the rest wait for ``sweep``).
RECORD_EXPIRY_BUDGET = 2
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
        #: (expires at, scope_key, replica, keys) per record() call, oldest first.
        self._recordings: deque[tuple[float, Hashable, str, Sequence[bytes]]] = deque()
        self._entries = 0

    @property
    def size(self) -> int:
        """Entries held (expired ones included until dropped)."""
        return self._entries

    def record(
        self,
        scope_key: Hashable,
        replica_id: str,
        keys: Sequence[bytes],
        tokens_per_block: int,
        *,
        start: int = 0,
    ) -> None:
        """``replica_id`` was chosen for a prompt with ``keys`` (``tokens_per_block`` each);
        ``keys[:start]`` are known cached there already (the KV index matched them), so only
        ``keys[start:]`` are recorded."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if start:
            keys = keys[start:]
        if not keys:
            return
        now = self._clock()
        self._expire(now, RECORD_EXPIRY_BUDGET)
        holders = self._scopes.get(scope_key)
        if holders is None:
            holders = self._scopes[scope_key] = {}
        expires = now + self.ttl_s
        entry = (expires, tokens_per_block)
        added = 0
        for key in keys:
            held = holders.get(key)
            if held is None:
                holders[key] = {replica_id: entry}
                added += 1
            else:
                if replica_id not in held:
                    added += 1
                held[replica_id] = entry
        self._entries += added
        self._recordings.append((expires, scope_key, replica_id, keys))
        while self._entries > self.max_entries and self._recordings:
            self._drop_oldest()

    def match(
        self, scope_key: Hashable, keys: Sequence[bytes], after: Mapping[str, int] | None = None
    ) -> dict[str, int]:
        """Leading matched blocks per replica (only those with a live entry in the run).

        ``after``: blocks already matched per replica elsewhere (the KV index); a replica's
        run is then looked up from there and counts them. Without it runs start at block 0."""
        return {rid: blocks for rid, (blocks, _tokens) in self._walk(scope_key, keys, after, None).items()}

    def match_tokens(
        self,
        scope_key: Hashable,
        keys: Sequence[bytes],
        after: Mapping[str, int] | None = None,
        after_tokens: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Like :meth:`match`, in tokens: ``after_tokens[replica]`` for the blocks matched
        elsewhere (without it: those blocks at the first live entry's ``tokens_per_block``)
        plus each live entry's ``tokens_per_block`` as recorded (a chain may mix recordings
        of different block sizes: a byte match's blocks, then its byte chunks)."""
        walked = self._walk(scope_key, keys, after, after_tokens)
        return {rid: tokens for rid, (_blocks, tokens) in walked.items()}

    def forget(self, replica_id: str) -> None:
        """Drop every entry of ``replica_id`` (its engine restarted or resynced: what we
        guessed it would cache is gone). O(entries); rare."""
        removed = 0
        for scope_key, holders in list(self._scopes.items()):
            for key, held in list(holders.items()):
                if held.pop(replica_id, None) is not None:
                    removed += 1
                    if not held:
                        del holders[key]
            if not holders:
                del self._scopes[scope_key]
        self._entries -= removed

    def sweep(self, max_keys: int | None = None) -> int:
        """Drop expired entries now, oldest recording first; returns how many were dropped.

        ``max_keys``: stop once the recordings dropped held that many keys (a burst of
        long cold prompts leaves hundreds of thousands to expire at once: about 40 ms in
        one go for 300 recordings of 512 keys, a stall of every request behind it; the
        server sweeps in slices, yielding between them, while :attr:`expired` says more
        are due). ``None``: everything expired."""
        before = self._entries
        self._expire(self._clock(), max_keys, by_keys=True)
        return before - self._entries

    @property
    def expired(self) -> bool:
        """Some recording has expired and waits for ``sweep``."""
        return bool(self._recordings) and self._recordings[0][0] <= self._clock()

    def _walk(
        self,
        scope_key: Hashable,
        keys: Sequence[bytes],
        after: Mapping[str, int] | None,
        after_tokens: Mapping[str, int] | None,
    ) -> dict[str, tuple[int, int]]:
        holders = self._scopes.get(scope_key)
        if not holders or not keys:
            return {}
        starts = {rid: n for rid, n in after.items() if n > 0} if after else {}
        first = holders.get(keys[0])
        if first is not None:
            for rid in first:
                starts.setdefault(rid, 0)
        now = self._clock()
        out: dict[str, tuple[int, int]] = {}
        for rid, start in starts.items():
            if start >= len(keys):
                continue  # the index matched it all
            i, tokens, first_size = start, 0, 0
            for key in keys[start:] if start else keys:
                held = holders.get(key)
                entry = held.get(rid) if held is not None else None
                if entry is None or entry[0] <= now:
                    break
                tokens += entry[1]
                first_size = first_size or entry[1]
                i += 1
            if i > start:
                before = after_tokens.get(rid) if after_tokens is not None else None
                out[rid] = (i, tokens + (start * first_size if before is None else before))
        return out

    def _expire(self, now: float, budget: int | None = None, *, by_keys: bool = False) -> None:
        """Drop expired recordings, oldest first, while ``budget`` lasts (``None``: all): a
        recording costs 1, or with ``by_keys`` its number of keys (the last one dropped may
        overrun the budget).

        ``record`` drops only a few per call, so the request path never pays for a whole
        burst's worth of expired entries at once (``sweep`` takes the rest); expired
        entries never match either way."""
        recordings = self._recordings
        while recordings and recordings[0][0] <= now and (budget is None or budget > 0):
            if budget is not None:
                budget -= len(recordings[0][3]) if by_keys else 1
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Forget the oldest recording: each of its entries unless a later one refreshed it."""
        expires, scope_key, rid, keys = self._recordings.popleft()
        holders = self._scopes.get(scope_key)
        if holders is None:
            return
        removed = 0
        for key in keys:
            held = holders.get(key)
            if held is None:
                continue
            entry = held.get(rid)
            if entry is not None and entry[0] <= expires:
                del held[rid]
                removed += 1
                if not held:
                    del holders[key]
        self._entries -= removed
        if not holders:
            del self._scopes[scope_key]
