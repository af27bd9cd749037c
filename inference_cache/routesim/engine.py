"""A simulated vLLM replica in virtual time: finite KV blocks with an LRU of free blocks,
FCFS chunked prefill with queueing, then decode holding the blocks.

Owner: ``inference_cache.routesim``. Driven by ``sim`` (which owns the clock and the event
heap); the replica only decides what happens to one request and for how long. Place in the
flow::

    sim: arrival --Replica.enqueue--> waiting (FCFS)
         Replica.start(now) --> Job admitted: hit = longest resident prefix (at schedule time,
             capped one block short, as vLLM always recomputes the last token), blocks pinned,
             free blocks evicted LRU-first (BlockRemoved), prefill duration
         prefill done --> first token (TTFT); BlockStored of the computed blocks; decode
         finish --Replica.release--> blocks unpinned, appended tail first to the free LRU

KV pool: ``capacity_blocks``. A request pins its full prompt blocks (cached, hashable) and
anonymous blocks for its partial last prompt block and its output. Pinned blocks are never
evicted; unpinned cached blocks sit in the free LRU (vLLM v1's free queue: a released
sequence is appended tail first, so its tail is evicted before its prefix). A request that
needs more blocks than the whole pool runs uncached, touching nothing (``Job.oversize``).
When the pinned blocks leave no room, the queue head waits for a release (``stalled``).

Time: one request prefills at a time (serial FCFS, vLLM's chunked prefill with the token
budget shared by prefills and decodes): ``ceil(uncached / chunk_tokens)`` steps, each
costing ``step_overhead_s + decoding x decode_step_s``, plus ``uncached / prefill_tokens_per_s``.
Decode lasts ``output_tokens x tpot_s``.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from inference_cache.routesim.trace import Request


@dataclass(frozen=True, slots=True)
class EngineSettings:
    capacity_tokens: int = 300_000
    #: The fake engine's ``prefill_tokens_per_second`` (and the scorer's default).
    prefill_tokens_per_s: float = 10_000.0
    #: vLLM's ``max_num_batched_tokens`` with chunked prefill.
    chunk_tokens: int = 8192
    step_overhead_s: float = 0.005
    #: Cost of each decoding request in a step that also carries a prefill chunk.
    decode_step_s: float = 0.0001
    tpot_s: float = 0.02
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.capacity_tokens <= 0 or self.chunk_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("capacity_tokens, chunk_tokens and max_num_seqs must be > 0")
        if not self.prefill_tokens_per_s > 0:
            raise ValueError("prefill_tokens_per_s must be > 0")


#: (replica, block ids) -> None: BlockStored / BlockRemoved as the engine would publish them.
Emit = Callable[[int, list[int]], None]


class Job:
    """One request on one replica."""

    __slots__ = ("anon", "arrival_s", "handle", "hit_tokens", "oversize", "pinned", "request", "stalled")

    def __init__(self, request: Request, handle: object) -> None:
        self.request = request
        self.arrival_s = request.arrival_s
        #: The router's bookkeeping for this request (given back on first token and finish).
        self.handle = handle
        self.hit_tokens = 0
        self.pinned: tuple[int, ...] = ()
        self.anon = 0
        self.oversize = False
        self.stalled = False


class Replica:
    def __init__(
        self, rid: int, settings: EngineSettings, block_tokens: int, stored: Emit, removed: Emit
    ) -> None:
        self.rid = rid
        self.s = settings
        self.block_tokens = block_tokens
        self.capacity_blocks = max(1, settings.capacity_tokens // block_tokens)
        self._stored = stored
        self._removed = removed
        #: Resident cached block -> pin count.
        self.refs: dict[int, int] = {}
        #: Resident unpinned blocks, eviction order (head first).
        self.free: OrderedDict[int, None] = OrderedDict()
        self.anon = 0
        self.waiting: deque[Job] = deque()
        self.prefilling: Job | None = None
        self.decoding = 0
        #: Prompt tokens this replica computed (recomputed, not served from cache).
        self.prefill_tokens = 0
        self.stalls = 0

    # -- gauges, as vLLM's /metrics reports them ------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return self.decoding + (self.prefilling is not None)

    @property
    def kv_usage(self) -> float:
        return (len(self.refs) - len(self.free) + self.anon) / self.capacity_blocks

    # -- lifecycle ----------------------------------------------------------------------------
    def enqueue(self, job: Job) -> None:
        self.waiting.append(job)

    def start(self) -> tuple[Job, float] | None:
        """Admit the queue head if the prefill server is idle and blocks allow: the job and
        its prefill duration; ``None`` when nothing can start now."""
        if self.prefilling is not None or not self.waiting or self.num_running >= self.s.max_num_seqs:
            return None
        job = self.waiting[0]
        if not self._admit(job):
            if not job.stalled:
                job.stalled = True
                self.stalls += 1
            return None
        self.waiting.popleft()
        self.prefilling = job
        uncached = max(job.request.input_tokens - job.hit_tokens, 1)
        self.prefill_tokens += uncached
        steps = math.ceil(uncached / self.s.chunk_tokens)
        step_s = self.s.step_overhead_s + self.decoding * self.s.decode_step_s
        return job, steps * step_s + uncached / self.s.prefill_tokens_per_s

    def prefilled(self, job: Job) -> None:
        """The job's prefill finished: the blocks after its hit are stored (again, for those
        resident behind a gap: idempotent for an index); it decodes."""
        self.prefilling = None
        self.decoding += 1
        new = job.pinned[job.hit_tokens // self.block_tokens :]
        if new:
            self._stored(self.rid, list(new))

    def release(self, job: Job) -> None:
        """The job finished: unpin its blocks, tail first into the free LRU."""
        self.decoding -= 1
        self.anon -= job.anon
        refs, free = self.refs, self.free
        for b in reversed(job.pinned):
            n = refs[b] - 1
            refs[b] = n
            if n == 0:
                free[b] = None

    def _admit(self, job: Job) -> bool:
        req = job.request
        bs = self.block_tokens
        need = math.ceil((req.input_tokens + req.output_tokens) / bs)
        if need > self.capacity_blocks:
            job.oversize = True
            return True
        refs, free = self.refs, self.free
        cap = (req.input_tokens - 1) // bs
        hit = 0
        for b in req.blocks[:cap]:
            if b not in refs:
                break
            hit += 1
        new = [b for b in req.blocks if b not in refs]
        anon = need - len(req.blocks)
        evictable = len(free) - sum(1 for b in req.blocks if b in free)
        room = self.capacity_blocks - len(refs) - self.anon
        if room + evictable < len(new) + anon:
            return False
        for b in req.blocks:
            n = refs.get(b)
            if n is not None:
                refs[b] = n + 1
                if n == 0:
                    del free[b]
        removed = []
        while room < len(new) + anon:
            b, _ = free.popitem(last=False)
            del refs[b]
            removed.append(b)
            room += 1
        if removed:
            self._removed(self.rid, removed)
        for b in new:
            refs[b] = 1
        self.anon += anon
        job.anon = anon
        job.hit_tokens = hit * bs
        job.pinned = req.blocks
        return True
