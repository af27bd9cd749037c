"""The simulated replica: prefix hits at schedule time capped one block short, LRU of free
blocks evicting a released prompt's tail first, oversize requests uncached, KV stalls."""

from __future__ import annotations

from inference_cache.routesim.engine import EngineSettings, Job, Replica
from inference_cache.routesim.trace import Request

BS = 16


class Events:
    def __init__(self) -> None:
        self.stored: list[list[int]] = []
        self.removed: list[list[int]] = []


def replica(capacity_blocks: int, events: Events | None = None) -> Replica:
    ev = events or Events()
    settings = EngineSettings(
        capacity_tokens=capacity_blocks * BS, prefill_tokens_per_s=1000.0, step_overhead_s=0.0
    )
    return Replica(0, settings, BS, lambda _r, b: ev.stored.append(b), lambda _r, b: ev.removed.append(b))


def req(blocks: tuple[int, ...], extra_tokens: int = 1, output: int = 0) -> Request:
    return Request(0.0, len(blocks) * BS + extra_tokens, output, blocks)


def run(r: Replica, request: Request) -> Job:
    job = Job(request, None)
    r.enqueue(job)
    started = r.start()
    assert started is not None
    r.prefilled(job)
    r.release(job)
    return job


def test_a_repeated_prompt_hits_its_resident_prefix_and_computes_only_the_rest() -> None:
    ev = Events()
    r = replica(100, ev)
    first = run(r, req((1, 2, 3)))
    assert first.hit_tokens == 0
    assert ev.stored == [[1, 2, 3]]
    second = Job(req((1, 2, 9)), None)
    r.enqueue(second)
    started = r.start()
    assert started is not None
    assert second.hit_tokens == 2 * BS
    # 16 + 1 uncached tokens at 1000 tokens/s.
    assert abs(started[1] - 0.017) < 1e-9


def test_a_full_hit_is_capped_one_block_short() -> None:
    r = replica(100)
    run(r, req((1, 2, 3), extra_tokens=0))
    again = run(r, req((1, 2, 3), extra_tokens=0))
    assert again.hit_tokens == 2 * BS


def test_eviction_takes_the_least_recent_free_blocks_tail_first() -> None:
    ev = Events()
    r = replica(4, ev)
    run(r, req((1, 2), extra_tokens=0))
    run(r, req((3, 4), extra_tokens=0))
    run(r, req((5,), extra_tokens=0))  # evicts the tail of the oldest prompt first
    assert ev.removed == [[2]]
    again = run(r, req((1, 2), extra_tokens=0))
    assert again.hit_tokens == BS  # the head survived its tail
    assert r.kv_usage == 0.0


def test_a_request_larger_than_the_cache_runs_uncached_and_is_counted() -> None:
    ev = Events()
    r = replica(2, ev)
    job = run(r, req((1, 2, 3)))
    assert job.oversize
    assert job.hit_tokens == 0
    assert ev.stored == [] and r.refs == {}
    assert r.prefill_tokens == 3 * BS + 1


def test_pinned_blocks_stall_the_queue_head_until_a_release() -> None:
    r = replica(4)
    a = Job(req((1, 2, 3), extra_tokens=0), None)
    r.enqueue(a)
    assert r.start() is not None
    r.prefilled(a)  # a decodes, holding 3 blocks
    b = Job(req((7, 8), extra_tokens=0), None)
    r.enqueue(b)
    assert r.start() is None
    assert r.stalls == 1 and r.num_waiting == 1 and r.num_running == 1
    r.release(a)
    assert r.start() is not None
    assert r.stalls == 1
