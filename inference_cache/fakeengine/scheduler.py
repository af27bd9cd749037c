"""The time model of the simulated engine: admission, prefill, decode, event batches.

Owner: ``inference_cache.fakeengine``; ``app`` calls :meth:`Engine.generate` per request,
the engine drives ``prefix_cache`` and hands its events to a sink (``publisher`` through
``events``). The model:

* at most ``max_num_seqs`` requests run; the others wait in FIFO order (the head of the
  queue also waits for KV blocks, as vLLM's scheduler does);
* a running request first prefills its uncached prompt tokens at
  ``prefill_tokens_per_second`` (its first token comes out then), then decodes one token
  every ``1 / decode_tokens_per_second``. ``prefill_sharing`` says whether concurrent
  prefills compete: ``independent`` (each prefills as if alone) or ``fcfs`` (one engine-wide
  prefill queue in admission order: a request's uncached tokens are processed after those
  of the requests admitted before it, as one GPU does with vLLM's chunked prefill, whose
  per-step token budget goes to the running requests in order; the same model as
  ``inference_cache.routesim.engine``). Decode is per request in both (memory-bound and
  batched: decoding requests do not slow each other, nor the prefills, down);
* ``num_running`` counts the admitted requests (KV blocks allocated, prompt looked up),
  including those queued for prefill, ``num_waiting`` those not admitted yet
  (``max_num_seqs`` or KV blocks). vLLM schedules a waiting request's first chunk into any
  step with token budget left (``max_num_batched_tokens``, 2,048 to 16,384 by default), so
  with prompts shorter than the budget a request queued behind another's prefill is
  ``running`` there too; a long prefill that fills whole steps would keep it ``waiting``
  in vLLM, which this model does not reproduce;
* the events recorded while handling one event-loop turn go out as one batch, the way vLLM
  publishes one batch per engine step;
* the clock is injected: :class:`LoopClock` follows the event loop, so a virtual-time loop
  (``looptime``) runs the model without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from inference_cache.fakeengine import events as ev
from inference_cache.fakeengine import prefix_cache
from inference_cache.fakeengine.hashing import LoRA
from inference_cache.fakeengine.prefix_cache import PrefixCache


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds (the ``ts`` of an event batch)."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The running event loop's clock for durations, ``time.time`` for timestamps."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


PrefillSharing = Literal["independent", "fcfs"]
PREFILL_SHARING: tuple[PrefillSharing, ...] = ("independent", "fcfs")


@dataclass(frozen=True)
class TimeModel:
    prefill_tokens_per_second: float = 10000.0
    decode_tokens_per_second: float = 100.0
    max_num_seqs: int = 256
    #: ``independent``: concurrent prefills do not slow each other; ``fcfs``: one prefill
    #: at a time, in admission order (see the module docstring).
    prefill_sharing: PrefillSharing = "independent"


class RequestRejected(ValueError):
    """The request can never be served (it needs more blocks than the engine has)."""


@dataclass(frozen=True)
class Admission:
    num_prompt_tokens: int
    num_cached_tokens: int


EventSink = Callable[[list[ev.Event]], None]


class Engine:
    def __init__(self, cache: PrefixCache, model: TimeModel, *, sink: EventSink, clock: Clock) -> None:
        self.cache = cache
        self.model = model
        self.clock = clock
        self._sink = sink
        self._waiting: deque[tuple[prefix_cache.Sequence, asyncio.Future[None]]] = deque()
        self._running = 0
        #: ``fcfs``: the admitted requests' prefill turns in order; the head is prefilling.
        self._prefill_queue: deque[asyncio.Future[None]] = deque()
        self._stalled_until = 0.0
        self._flush_scheduled = False

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_prefilling(self) -> int:
        """``fcfs``: admitted requests whose prefill is running or queued (0 otherwise)."""
        return len(self._prefill_queue)

    def stall(self, seconds: float) -> None:
        """Fault: no request makes progress for ``seconds`` from now."""
        self._stalled_until = max(self._stalled_until, self.clock.monotonic() + seconds)

    def reset_prefix_cache(self, *, force: bool = False) -> bool:
        done = self.cache.reset(force=force)
        self._events_recorded()
        return done

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise :class:`RequestRejected` if such a request can never run here."""
        if num_prompt_tokens < 1:
            raise RequestRejected("empty prompt")
        needed = self.cache.blocks_needed(num_prompt_tokens + max(max_tokens, 1) - 1)
        if needed > self.cache.usable_blocks:
            raise RequestRejected(
                f"the request needs {needed} KV blocks, the engine has {self.cache.usable_blocks}"
            )

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        *,
        output_token_ids: Sequence[int],
        lora: LoRA | None = None,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[Admission | int, None]:
        """Run one request: yields its :class:`Admission` once admitted, then each output
        token id when the time model produces it."""
        seq = prefix_cache.Sequence(
            list(prompt_token_ids), max_tokens=len(output_token_ids), lora=lora, cache_salt=cache_salt
        )
        self.check(len(seq.token_ids), len(output_token_ids))
        await self._admit(seq)
        turn = self._queue_prefill()
        try:
            yield Admission(seq.num_prompt_tokens, seq.num_cached_tokens)
            uncached = seq.num_prompt_tokens - seq.num_cached_tokens
            await turn
            await self._pause(uncached / self.model.prefill_tokens_per_second)
            self._prefill_done(turn)
            for i, token in enumerate(output_token_ids):
                if i:
                    await self._pause(1.0 / self.model.decode_tokens_per_second)
                    self.cache.advance(seq, token)
                    self._events_recorded()
                else:
                    seq.token_ids.append(token)
                yield token
        finally:
            self._prefill_done(turn)
            self.cache.free(seq)
            self._running -= 1
            self._admit_waiting()

    def _queue_prefill(self) -> asyncio.Future[None]:
        """An admitted request's turn to prefill: done at once (``independent``, or an idle
        ``fcfs`` engine), else when the requests admitted before it are prefilled."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.model.prefill_sharing == "independent":
            turn.set_result(None)
            return turn
        if not self._prefill_queue:
            turn.set_result(None)
        self._prefill_queue.append(turn)
        return turn

    def _prefill_done(self, turn: asyncio.Future[None]) -> None:
        """``turn`` leaves the prefill queue (prefilled, or cancelled while prefilling or
        queued; idempotent); the next one in line starts when the head left."""
        queue = self._prefill_queue
        if turn not in queue:
            return
        head = queue[0] is turn
        queue.remove(turn)
        if head and queue and not queue[0].done():
            queue[0].set_result(None)

    async def _admit(self, seq: prefix_cache.Sequence) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((seq, fut))
        self._admit_waiting()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted, then cancelled: give it back
                self.cache.free(seq)
                self._running -= 1
                self._admit_waiting()
            else:
                with contextlib.suppress(ValueError):  # already skipped by _admit_waiting
                    self._waiting.remove((seq, fut))
            raise

    def _admit_waiting(self) -> None:
        while self._waiting and self._running < self.model.max_num_seqs:
            seq, fut = self._waiting[0]
            if fut.cancelled():
                self._waiting.popleft()
                continue
            if not self.cache.admit(seq):
                break
            self._waiting.popleft()
            self._running += 1
            fut.set_result(None)
            self._events_recorded()

    async def _pause(self, seconds: float) -> None:
        await self.clock.sleep(seconds)
        while (left := self._stalled_until - self.clock.monotonic()) > 0:
            await self.clock.sleep(left)

    def _events_recorded(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = self.cache.take_events()
        if batch:
            self._sink(batch)
