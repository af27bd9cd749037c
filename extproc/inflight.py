"""Our in-flight load per replica: requests we routed there and their prefill work ahead.

Owner: ``inference_cache.extproc`` (the picker); pure bookkeeping with an injected clock,
also driven by the trace-replay benchmark. Place in the flow::

    Picker.pick     --begin(replica, uncached tokens)--> Ticket (in Decision.state)
    Picker.finished --end(ticket, linger=...)-->          request no longer in flight
    engine scrape   --observe_engine(running, waiting, at, kv_usage=)--> correction, gauges
    Picker.pick     --load(replica), engine(replica)--> Load, EngineGauges --> scoring.Candidate

A request is in flight from ``begin`` until ``end``. ``end(linger=True)`` is for when we
cannot see the response end (response processing off: only the ext_proc stream closed):
the request stays counted until ``now + linger_s``.

Prefill work is a virtual FIFO server per replica draining at ``prefill_tokens_per_s``
(the scorer's rate): ``begin`` appends the request's uncached tokens behind the backlog,
``load`` reports what is left at ``now``. A response that completed (``end(linger=False)``)
proves its prefill finished: its remaining share is taken off. Lingering ends change
nothing (the backlog drains by time).

Correction from the engine's gauges (``observe_engine``), ``engine = running + waiting``
at scrape time ``at``, ``ours = our counted tickets begun at or before at``:

- ``engine < ours``: we over-count; the ``ours - engine`` lingering tickets closest to
  expiry (begun at or before ``at``) are dropped: they must have finished. Tickets whose
  end we will see are never dropped.
- ``engine > ours``: others (other routers, direct clients) sent ``engine - ours`` requests
  we cannot see; they are added to the replica's count until the next observation.

Every call but ``observe_engine`` is O(1) amortised per replica; ``observe_engine`` (once
per scrape) walks the active tickets begun since the scrape and the lingering tickets.
Not thread-safe: the picker runs on one event loop.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from inference_cache.extproc import scoring
from inference_cache.extproc.scoring import DEFAULT_PREFILL_TOKENS_PER_S

Clock = Callable[[], float]


class Load(NamedTuple):
    """A replica's in-flight load as the scorer wants it."""

    requests: int
    prefill_tokens: int


@dataclass(frozen=True, slots=True)
class EngineGauges:
    """The engine's last scraped gauges, kept for the scorer (``None`` = not reported)."""

    running: float | None
    waiting: float | None
    kv_usage: float | None
    #: When they were scraped (this tracker's clock).
    at: float


class Ticket:
    """One routed request; opaque to callers (pass it back to :meth:`InflightTracker.end`)."""

    __slots__ = ("_replica", "begun_at", "done_at", "ended", "prefill_tokens", "replica_id")

    def __init__(
        self, replica: _Replica, replica_id: str, prefill_tokens: int, begun_at: float, done_at: float
    ) -> None:
        self._replica = replica
        self.replica_id = replica_id
        self.prefill_tokens = prefill_tokens
        self.begun_at = begun_at
        #: When the virtual prefill server finishes this ticket's tokens.
        self.done_at = done_at
        self.ended = False


class _Replica:
    __slots__ = ("active", "busy_until", "engine", "external", "lingering")

    def __init__(self) -> None:
        #: Tickets not ended, in begin order.
        self.active: OrderedDict[Ticket, None] = OrderedDict()
        #: Tickets ended with linger -> expiry time, in expiry order.
        self.lingering: OrderedDict[Ticket, float] = OrderedDict()
        #: Requests others sent, from the last engine observation.
        self.external = 0
        #: When the virtual prefill server drains the backlog.
        self.busy_until = 0.0
        self.engine: EngineGauges | None = None


class InflightTracker:
    def __init__(
        self,
        *,
        linger_s: float,
        clock: Clock,
        prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
    ) -> None:
        if not linger_s >= 0:
            raise ValueError(f"linger_s must be >= 0, got {linger_s}")
        if not prefill_tokens_per_s > 0:
            raise ValueError(f"prefill_tokens_per_s must be > 0, got {prefill_tokens_per_s}")
        self.linger_s = linger_s
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def begin(self, replica_id: str, prefill_tokens: int) -> Ticket:
        """Count a request routed to ``replica_id`` with ``prefill_tokens`` uncached tokens."""
        now = self._clock()
        r = self._replicas.get(replica_id)
        if r is None:
            r = self._replicas[replica_id] = _Replica()
        tokens = max(prefill_tokens, 0)
        r.busy_until = max(r.busy_until, now) + tokens / self.prefill_tokens_per_s
        ticket = Ticket(r, replica_id, tokens, now, r.busy_until)
        r.active[ticket] = None
        return ticket

    def end(self, ticket: Ticket, *, linger: bool) -> None:
        """The request ended (``linger=False``: its response completed) or its ext_proc
        stream closed with the response unseen (``linger=True``: counted ``linger_s`` more).
        A second end, or an end after ``forget``, is ignored."""
        if ticket.ended:
            return
        ticket.ended = True
        r = ticket._replica
        if self._replicas.get(ticket.replica_id) is not r:
            return
        del r.active[ticket]
        now = self._clock()
        if linger:
            r.lingering[ticket] = now + self.linger_s
        elif ticket.done_at > now:
            own_s = ticket.prefill_tokens / self.prefill_tokens_per_s
            r.busy_until = max(now, r.busy_until - min(own_s, ticket.done_at - now))

    def load(self, replica_id: str) -> Load:
        """What is in flight on ``replica_id`` now (``Load(0, 0)`` for an unknown one)."""
        r = self._replicas.get(replica_id)
        if r is None:
            return Load(0, 0)
        now = self._clock()
        self._expire(r, now)
        backlog = max(0.0, r.busy_until - now) * self.prefill_tokens_per_s
        return Load(len(r.active) + len(r.lingering) + r.external, round(backlog))

    def observe_engine(
        self,
        replica_id: str,
        running: float | None,
        waiting: float | None,
        at: float | None = None,
        *,
        kv_usage: float | None = None,
    ) -> None:
        """Correct ``replica_id``'s count from its engine's gauges scraped at ``at`` (this
        tracker's clock; default now) and keep them for :meth:`engine`. Running and waiting
        both ``None``: no count known, the external estimate is cleared."""
        now = self._clock()
        at = now if at is None else at
        r = self._replicas.get(replica_id)
        if r is None:
            r = self._replicas[replica_id] = _Replica()
        r.engine = EngineGauges(running, waiting, kv_usage, at)
        if running is None and waiting is None:
            r.external = 0
            return
        self._expire(r, now)
        engine = round(_gauge(running) + _gauge(waiting))
        ours = len(r.active) - _begun_after(r.active, at)
        ours += sum(1 for t in r.lingering if t.begun_at <= at)
        excess = ours - engine
        if excess > 0:
            for t in [t for t in r.lingering if t.begun_at <= at][:excess]:
                del r.lingering[t]
        r.external = max(0, engine - ours)

    def engine(self, replica_id: str) -> EngineGauges | None:
        """The last gauges observed for ``replica_id`` (``None``: never observed)."""
        r = self._replicas.get(replica_id)
        return None if r is None else r.engine

    def candidates(
        self, replica_ids: Iterable[str], matched: Mapping[str, int], cap: int
    ) -> list[scoring.Candidate]:
        """The scorer's view of each replica: its match (capped at ``cap`` tokens, what an
        engine can report as cached) and the load we know of."""
        out = []
        for rid in replica_ids:
            reqs, prefill = self.load(rid)
            engine = self.engine(rid)
            out.append(
                scoring.Candidate(
                    replica_id=rid,
                    matched_tokens=min(matched.get(rid, 0), max(cap, 0)),
                    inflight_requests=reqs,
                    inflight_prefill_tokens=prefill,
                    engine_running=engine.running if engine else None,
                    engine_waiting=engine.waiting if engine else None,
                    kv_usage=engine.kv_usage if engine else None,
                )
            )
        return out

    def forget(self, replica_id: str) -> None:
        """Drop everything about ``replica_id`` (endpoint removed); its tickets' ends are ignored."""
        self._replicas.pop(replica_id, None)

    @staticmethod
    def _expire(r: _Replica, now: float) -> None:
        while r.lingering:
            ticket, until = next(iter(r.lingering.items()))
            if until > now:
                break
            del r.lingering[ticket]


def _gauge(value: float | None) -> float:
    """A request gauge as a count: unknown, negative, NaN or infinite -> 0."""
    return value if value is not None and 0 < value < math.inf else 0.0


def _begun_after(active: OrderedDict[Ticket, None], at: float) -> int:
    """Active tickets begun after ``at`` (they are at the end of the begin-ordered dict)."""
    n = 0
    for t in reversed(active):
        if t.begun_at <= at:
            break
        n += 1
    return n
