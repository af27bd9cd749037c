"""The time model in virtual time (looptime): prefill of uncached tokens, decode per token,
``max_num_seqs`` with a FIFO queue, waiting for blocks, stalls, one event batch per loop turn;
``prefill_sharing``: independent prefills, or one FCFS prefill queue per engine."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from inference_cache.fakeengine import events
from inference_cache.fakeengine.hashing import BlockHasher
from inference_cache.fakeengine.prefix_cache import PrefixCache
from inference_cache.fakeengine.scheduler import (
    Admission,
    Engine,
    LoopClock,
    PrefillSharing,
    RequestRejected,
    TimeModel,
)

pytestmark = pytest.mark.looptime


def engine(
    batches: list[list[events.Event]],
    *,
    num_gpu_blocks: int = 64,
    max_num_seqs: int = 4,
    sharing: PrefillSharing = "independent",
) -> Engine:
    pc = PrefixCache(num_gpu_blocks=num_gpu_blocks, hasher=BlockHasher.create("sha256", "0", 4, (0, 33, 0)))
    model = TimeModel(
        prefill_tokens_per_second=4.0,
        decode_tokens_per_second=2.0,
        max_num_seqs=max_num_seqs,
        prefill_sharing=sharing,
    )
    return Engine(pc, model, sink=batches.append, clock=LoopClock())


async def timeline(eng: Engine, prompt: list[int], n: int) -> list[tuple[float, Admission | int]]:
    loop = asyncio.get_running_loop()
    out: list[tuple[float, Admission | int]] = []
    async with contextlib.aclosing(eng.generate(prompt, output_token_ids=list(range(900, 900 + n)))) as steps:
        async for step in steps:
            out.append((loop.time(), step))
    return out


async def test_prefill_then_decode() -> None:
    batches: list[list[events.Event]] = []
    eng = engine(batches)
    t0 = asyncio.get_running_loop().time()
    got = await timeline(eng, list(range(8)), 3)
    assert [(round(t - t0, 6), s) for t, s in got] == [
        (0.0, Admission(8, 0)),
        (2.0, 900),  # 8 uncached tokens at 4/s
        (2.5, 901),  # then 2 tokens/s
        (3.0, 902),
    ]
    assert eng.num_running == 0
    await asyncio.sleep(0)
    assert [type(e) for b in batches for e in b] == [events.BlockStored]


async def test_cached_prefix_shortens_prefill() -> None:
    eng = engine([])
    await timeline(eng, list(range(8)), 1)
    t0 = asyncio.get_running_loop().time()
    got = await timeline(eng, list(range(9)), 1)
    assert got[0][1] == Admission(9, 8)
    assert round(got[1][0] - t0, 6) == 0.25  # one uncached token


async def test_max_num_seqs_queues_fifo() -> None:
    eng = engine([], max_num_seqs=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.create_task(timeline(eng, [1, 2, 3, 4], 1))
    second = asyncio.create_task(timeline(eng, [5, 6, 7, 8], 1))
    await asyncio.sleep(0.5)
    assert (eng.num_running, eng.num_waiting) == (1, 1)
    a, b = await first, await second
    assert round(a[-1][0] - t0, 6) == 1.0
    assert round(b[0][0] - t0, 6) == 1.0 and round(b[-1][0] - t0, 6) == 2.0


async def test_waits_for_blocks() -> None:
    eng = engine([], num_gpu_blocks=3)  # 2 usable blocks of 4 tokens
    t0 = asyncio.get_running_loop().time()
    first = asyncio.create_task(timeline(eng, list(range(5)), 1))  # 2 blocks
    second = asyncio.create_task(timeline(eng, list(range(10, 14)), 1))  # 1 block: must wait
    await asyncio.sleep(0.1)
    assert eng.num_waiting == 1
    await first
    b = await second
    assert round(b[0][0] - t0, 6) == 1.25


async def test_too_big_is_rejected() -> None:
    eng = engine([], num_gpu_blocks=3)
    with pytest.raises(RequestRejected):
        await timeline(eng, list(range(20)), 1)


async def test_stall_holds_progress() -> None:
    eng = engine([])
    t0 = asyncio.get_running_loop().time()
    eng.stall(10.0)
    got = await timeline(eng, [1, 2, 3, 4], 2)
    assert round(got[1][0] - t0, 6) == 10.0 and round(got[2][0] - t0, 6) == 10.5


async def test_cancelled_while_waiting_leaves_the_queue() -> None:
    eng = engine([], max_num_seqs=1)
    first = asyncio.create_task(timeline(eng, [1, 2, 3, 4], 4))
    second = asyncio.create_task(timeline(eng, [5, 6, 7, 8], 1))
    await asyncio.sleep(0.1)
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    assert eng.num_waiting == 0
    await first
    assert eng.num_running == 0 and eng.cache.num_free_blocks() == eng.cache.usable_blocks


async def test_events_of_one_turn_form_one_batch() -> None:
    batches: list[list[events.Event]] = []
    eng = engine(batches)
    await asyncio.gather(timeline(eng, [1, 2, 3, 4, 5], 1), timeline(eng, [6, 7, 8, 9, 10], 1))
    await asyncio.sleep(0)
    assert len(batches) == 1 and len(batches[0]) == 2
    assert eng.reset_prefix_cache()
    await asyncio.sleep(0)
    assert batches[-1] == [events.AllBlocksCleared()]


def offsets(t0: float, got: list[tuple[float, Admission | int]]) -> list[float]:
    return [round(t - t0, 6) for t, _ in got]


async def test_independent_prefills_overlap() -> None:
    eng = engine([])
    t0 = asyncio.get_running_loop().time()
    a, b = await asyncio.gather(timeline(eng, list(range(8)), 1), timeline(eng, list(range(10, 18)), 1))
    assert offsets(t0, a) == offsets(t0, b) == [0.0, 2.0]


async def test_fcfs_second_prefill_waits_for_the_first() -> None:
    eng = engine([], sharing="fcfs")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.create_task(timeline(eng, list(range(8)), 2))
    second = asyncio.create_task(timeline(eng, list(range(10, 18)), 2))
    await asyncio.sleep(1.0)
    assert (eng.num_running, eng.num_waiting, eng.num_prefilling) == (2, 0, 2)  # both admitted
    a, b = await first, await second
    assert offsets(t0, a) == [0.0, 2.0, 2.5]  # 8 tokens at 4/s, then decode
    assert offsets(t0, b) == [0.0, 4.0, 4.5]  # after both prefills; decode is per request
    assert eng.num_prefilling == 0


async def test_fcfs_cached_request_queues_behind_a_long_prefill() -> None:
    eng = engine([], sharing="fcfs")
    await timeline(eng, list(range(8)), 1)  # cached: 8 tokens
    t0 = asyncio.get_running_loop().time()
    long = asyncio.create_task(timeline(eng, list(range(100, 116)), 1))  # 4 s of prefill
    await asyncio.sleep(0)
    short = await timeline(eng, list(range(9)), 1)  # one uncached token
    assert short[0][1] == Admission(9, 8)
    assert offsets(t0, short) == [0.0, 4.25]
    assert offsets(t0, await long) == [0.0, 4.0]


async def test_fcfs_stall_holds_the_queue() -> None:
    eng = engine([], sharing="fcfs")
    t0 = asyncio.get_running_loop().time()
    eng.stall(10.0)
    a, b = await asyncio.gather(timeline(eng, [1, 2, 3, 4], 1), timeline(eng, [5, 6, 7, 8], 1))
    assert offsets(t0, a) == [0.0, 10.0] and offsets(t0, b) == [0.0, 11.0]


async def test_fcfs_cancelled_while_queued_leaves_the_prefill_queue() -> None:
    eng = engine([], sharing="fcfs")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.create_task(timeline(eng, list(range(8)), 1))  # prefills 0 .. 2 s
    second = asyncio.create_task(timeline(eng, list(range(10, 18)), 1))  # queued
    third = asyncio.create_task(timeline(eng, list(range(20, 28)), 1))  # queued behind it
    await asyncio.sleep(0.5)
    assert eng.num_prefilling == 3
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    assert (eng.num_prefilling, eng.num_running) == (2, 2)
    assert offsets(t0, await first) == [0.0, 2.0]
    assert offsets(t0, await third) == [0.0, 4.0]  # moved up: 2 s after the first
    assert (eng.num_prefilling, eng.num_running) == (0, 0)
    assert eng.cache.num_free_blocks() == eng.cache.usable_blocks


async def test_fcfs_cancelled_while_prefilling_starts_the_next() -> None:
    eng = engine([], sharing="fcfs")
    t0 = asyncio.get_running_loop().time()
    first = asyncio.create_task(timeline(eng, list(range(8)), 1))
    second = asyncio.create_task(timeline(eng, list(range(10, 18)), 1))
    await asyncio.sleep(1.0)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert offsets(t0, await second) == [0.0, 3.0]  # starts at 1 s, when the first left
    assert eng.num_prefilling == 0
