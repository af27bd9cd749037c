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

Storage: per scope one dict from ``block key + replica suffix`` (4 bytes per replica) to
``expires_us << 24 | tokens_per_block``: ints and bytes only, so the cyclic GC never
tracks it. A dict of per-key dicts of tuples was walked entry by entry by every full
collection: about 10-15 ms of CPU inline in some request with 150k live entries (a burst
of 32k-token first turns), ~100 ms at the 1M entry bound (docs/benchmarks.md, "GC pauses").
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence

Clock = Callable[[], float]
#: Expired recordings ``record`` drops per call (the rest wait for ``sweep``).
RECORD_EXPIRY_BUDGET = 2
_TOKENS_BITS = 24
_TOKENS_MASK = (1 << _TOKENS_BITS) - 1
_SUFFIX = struct.Struct("<I")


def _us(t: float) -> int:
    return int(t * 1_000_000)


class SpeculativeIndex:
    def __init__(self, *, ttl_s: float = 2.0, clock: Clock, max_entries: int = 1_000_000) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        #: scope -> block key + replica suffix -> ``expires_us << 24 | tokens per block``.
        self._scopes: dict[Hashable, dict[bytes, int]] = {}
        #: scope -> replica -> its entries there (the replicas a walk may start from).
        self._held: dict[Hashable, dict[str, int]] = {}
        self._suffixes: dict[str, bytes] = {}
        self._next_suffix = 0
        #: (expires at µs, scope_key, replica, keys) per record() call, oldest first.
        self._recordings: deque[tuple[int, Hashable, str, tuple[bytes, ...]]] = deque()
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
        if not 0 < tokens_per_block <= _TOKENS_MASK:
            raise ValueError(f"tokens_per_block must be in 1..{_TOKENS_MASK}, got {tokens_per_block}")
        if start:
            keys = keys[start:]
        if not keys:
            return
        now = self._clock()
        self._expire(_us(now), RECORD_EXPIRY_BUDGET)
        holders = self._scopes.get(scope_key)
        if holders is None:
            holders = self._scopes[scope_key] = {}
        suffix = self._suffixes.get(replica_id)
        if suffix is None:
            suffix = self._suffixes[replica_id] = _SUFFIX.pack(self._next_suffix)
            self._next_suffix += 1
        expires = _us(now + self.ttl_s)
        value = expires << _TOKENS_BITS | tokens_per_block
        before = len(holders)
        for key in keys:
            holders[key + suffix] = value
        added = len(holders) - before
        if added:
            counts = self._held.setdefault(scope_key, {})
            counts[replica_id] = counts.get(replica_id, 0) + added
            self._entries += added
        self._recordings.append((expires, scope_key, replica_id, tuple(keys)))
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
        guessed it would cache is gone). O(entries of the scopes it holds entries in); rare."""
        suffix = self._suffixes.pop(replica_id, None)
        if suffix is None:
            return
        for scope_key, counts in list(self._held.items()):
            if counts.pop(replica_id, None) is None:
                continue
            holders = self._scopes[scope_key]
            mine = [k for k in holders if k.endswith(suffix)]
            for k in mine:
                del holders[k]
            self._entries -= len(mine)
            if not counts:
                del self._held[scope_key]
            if not holders:
                del self._scopes[scope_key]

    def sweep(self, max_keys: int | None = None) -> int:
        """Drop expired entries now, oldest recording first; returns how many were dropped.

        ``max_keys``: stop once the recordings dropped held that many keys (a burst of
        long cold prompts leaves hundreds of thousands to expire at once: about 40 ms in
        one go for 300 recordings of 512 keys, a stall of every request behind it; the
        server sweeps in slices, yielding between them, while :attr:`expired` says more
        are due). ``None``: everything expired."""
        before = self._entries
        self._expire(_us(self._clock()), max_keys, by_keys=True)
        return before - self._entries

    @property
    def expired(self) -> bool:
        """Some recording has expired and waits for ``sweep``."""
        return bool(self._recordings) and self._recordings[0][0] <= _us(self._clock())

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
        suffixes = self._suffixes
        first = keys[0]
        for rid in self._held.get(scope_key, ()):
            if first + suffixes[rid] in holders:
                starts.setdefault(rid, 0)
        now = _us(self._clock())
        out: dict[str, tuple[int, int]] = {}
        for rid, start in starts.items():
            suffix = suffixes.get(rid)
            if suffix is None or start >= len(keys):
                continue  # nothing recorded there, or the index matched it all
            i, tokens, first_size = start, 0, 0
            for key in keys[start:] if start else keys:
                value = holders.get(key + suffix)
                if value is None or value >> _TOKENS_BITS <= now:
                    break
                size = value & _TOKENS_MASK
                tokens += size
                first_size = first_size or size
                i += 1
            if i > start:
                before = after_tokens.get(rid) if after_tokens is not None else None
                out[rid] = (i, tokens + (start * first_size if before is None else before))
        return out

    def _expire(self, now_us: int, budget: int | None = None, *, by_keys: bool = False) -> None:
        """Drop expired recordings, oldest first, while ``budget`` lasts (``None``: all): a
        recording costs 1, or with ``by_keys`` its number of keys (the last one dropped may
        overrun the budget).

        ``record`` drops only a few per call, so the request path never pays for a whole
        burst's worth of expired entries at once (``sweep`` takes the rest); expired
        entries never match either way."""
        recordings = self._recordings
        while recordings and recordings[0][0] <= now_us and (budget is None or budget > 0):
            if budget is not None:
                budget -= len(recordings[0][3]) if by_keys else 1
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Forget the oldest recording: each of its entries unless a later one refreshed it."""
        expires, scope_key, rid, keys = self._recordings.popleft()
        holders = self._scopes.get(scope_key)
        suffix = self._suffixes.get(rid)
        if holders is None or suffix is None:
            return  # forgotten since
        removed = 0
        for key in keys:
            k = key + suffix
            value = holders.get(k)
            if value is not None and value >> _TOKENS_BITS <= expires:
                del holders[k]
                removed += 1
        if removed:
            self._entries -= removed
            counts = self._held[scope_key]
            left = counts[rid] - removed
            if left > 0:
                counts[rid] = left
            else:
                del counts[rid]
                if not counts:
                    del self._held[scope_key]
        if not holders:
            del self._scopes[scope_key]
