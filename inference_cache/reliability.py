"""``inference-cache bench recovery``: how long each fault takes to be repaired.

Owner: the reliability work (``docs/reliability.md``, ``tests/envoy/test_faults.py``). Runs
real fake engines (HTTP, ZMQ KV events, replay) and our ``Server`` in-process, injects the
faults the tests inject, and times, from the fault to the repaired state, with a monotonic
clock polled every millisecond:

- ``engine_restart``: publisher back to sequence 0 and cache cleared, then one request on
  that engine -> its old blocks gone from our index and the new ones indexed;
- ``dropped_batches``: one batch lost, the next one published -> the gap replayed (the lost
  conversation indexed);
- ``server_restart``: a fresh server on the same engines -> every earlier conversation
  indexed again from replay;
- ``stall``: the engine stalled with requests queued on it -> our picker ranks another
  engine first for a prompt cached on the stalled one (its scraped gauges).

Prints a table (median and max over ``--rounds``), ``--json OUT`` writes the samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from inference_cache import config as config_mod
from inference_cache.extproc.serve import Server
from inference_cache.fakeengine import main as fakeengine
from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.index import types

MODEL = "recovery-model"
BS = 16
DEADLINE_S = 30.0
CASES = ("engine_restart", "dropped_batches", "server_restart", "stall")


def messages(i: int) -> list[dict[str, str]]:
    system = f"[run-{i}] " + " ".join(f"fact-{i}-{k}" for k in range(80))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Question about {i}?"}]


async def until(condition: Callable[[], bool], what: str) -> float:
    """Seconds until ``condition`` holds (polled every ms); raises after ``DEADLINE_S``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > DEADLINE_S:
            raise TimeoutError(f"never happened: {what}")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


class Bench:
    def __init__(self, tokenizer: Path, session: aiohttp.ClientSession, stack: contextlib.AsyncExitStack):
        self.tokenizer, self.session, self.stack = tokenizer, session, stack
        self.engines: list[fakeengine.Running] = []
        self.server: Server | None = None
        self.n = 0

    async def start(self, engines: int, time_model: TimeModel) -> None:
        ipc = self.stack.enter_context(tempfile.TemporaryDirectory(prefix="ic-recovery-"))
        for i in range(engines):
            r = await fakeengine.start(
                fakeengine.EngineConfig(
                    tokenizer=self.tokenizer,
                    model=MODEL,
                    port=0,
                    block_size=BS,
                    num_gpu_blocks=4096,
                    kv_events_endpoint=f"ipc://{ipc}/e{i}-events",
                    replay_endpoint=f"ipc://{ipc}/e{i}-replay",
                    time_model=time_model,
                )
            )
            self.stack.push_async_callback(r.close)
            self.engines.append(r)
        await self.new_server()

    async def new_server(self) -> Server:
        cfg = config_mod.Config(
            server=config_mod.ServerSettings.loopback(),
            models=(config_mod.ModelConfig(name=MODEL, block_size=BS, tokenizer=str(self.tokenizer)),),
            endpoints=tuple(
                config_mod.EndpointConfig(
                    address=f"127.0.0.1:{e.port}",
                    model=MODEL,
                    kv_events=e.config.kv_events_endpoint or "",
                    replay=e.config.replay_endpoint,
                    metrics_url=f"{e.url}/metrics",
                )
                for e in self.engines
            ),
            stats_interval_s=0.1,
        )
        config_mod.validate(cfg)
        self.server = Server(cfg)
        await self.server.start()
        self.stack.push_async_callback(self.server.stop, 0)
        return self.server

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.engines[i].port}"

    def indexed(self, i: int, conv: int) -> int:
        assert self.server is not None
        route = self.server.picker.routes[MODEL]
        assert route.tokenizer is not None
        prompt = self.server.picker.precise_prompt(route, route.tokenizer.encode_chat(messages(conv)))
        scope = types.Scope(route.tenant, MODEL, types.HASH_SCHEME_VLLM, "")
        found = self.server.index.longest_prefix(scope, prompt.keys)
        return next((m.matched_tokens for m in found if m.replica_id == self.address(i)), 0)

    async def chat(self, i: int, conv: int) -> int:
        body = {"model": MODEL, "messages": messages(conv), "max_tokens": 1}
        async with self.session.post(self.engines[i].url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            tokens: int = (await r.json())["usage"]["prompt_tokens"]
            return (tokens // BS) * BS

    async def fault(self, i: int, **switches: Any) -> None:
        async with self.session.post(self.engines[i].url + "/_fault", json=switches) as r:
            r.raise_for_status()

    async def stored(self, i: int) -> tuple[int, int]:
        """A new conversation on engine ``i``, waited for in the index: (id, full tokens)."""
        self.n += 1
        conv = self.n
        full = await self.chat(i, conv)
        await until(lambda: self.indexed(i, conv) == full, "indexed")
        return conv, full

    # -- the cases -----------------------------------------------------------------------
    async def engine_restart(self) -> float:
        old, _ = await self.stored(0)
        await self.fault(0, restart_publisher=True)
        start = time.monotonic()
        self.n += 1
        conv = self.n
        full = await self.chat(0, conv)
        await until(lambda: self.indexed(0, old) == 0 and self.indexed(0, conv) == full, "rebuilt")
        return time.monotonic() - start

    async def dropped_batches(self) -> float:
        await self.fault(0, drop_batches=1)
        self.n += 1
        lost = self.n
        full = await self.chat(0, lost)
        start = time.monotonic()
        await self.stored(0)  # its batch reveals the gap
        await until(lambda: self.indexed(0, lost) == full, "gap filled")
        return time.monotonic() - start

    async def server_restart(self) -> float:
        convs = [await self.stored(i % len(self.engines)) for i in range(4)]
        assert self.server is not None
        await self.server.stop(0)
        start = time.monotonic()
        await self.new_server()
        await until(
            lambda: all(self.indexed(k % len(self.engines), c) == f for k, (c, f) in enumerate(convs)),
            "replayed",
        )
        return time.monotonic() - start

    async def stall(self) -> float:
        conv, _ = await self.stored(0)
        server = self.server
        assert server is not None
        route = server.picker.routes[MODEL]
        assert route.tokenizer is not None
        prompt = server.picker.precise_prompt(route, route.tokenizer.encode_chat(messages(conv)))
        candidates = [self.address(i) for i in range(len(self.engines))]

        def first() -> str:
            return server.picker.rank(route, "", prompt, candidates).order[0].replica_id

        assert first() == self.address(0)
        await self.fault(0, stall_s=2.0)
        start = time.monotonic()
        stuck = [asyncio.create_task(self.chat(0, conv)) for _ in range(3)]
        try:
            await until(lambda: first() != self.address(0), "traffic moved")
            return time.monotonic() - start
        finally:
            await asyncio.gather(*stuck)


async def measure(tokenizer: Path, rounds: int, cases: tuple[str, ...]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {c: [] for c in cases}
    for case in cases:
        for _ in range(rounds):
            async with contextlib.AsyncExitStack() as stack:
                session = await stack.enter_async_context(aiohttp.ClientSession())
                bench = Bench(tokenizer, session, stack)
                await bench.start(2, TimeModel(max_num_seqs=2) if case == "stall" else TimeModel())
                await bench.stored(0)  # subscribers joined (ZMQ slow joiner)
                out[case].append(await getattr(bench, case)())
    return out


def table(samples: dict[str, list[float]]) -> str:
    lines = [f"{'fault':<18}{'rounds':>7}{'median ms':>11}{'max ms':>9}"]
    for case, xs in samples.items():
        lines.append(f"{case:<18}{len(xs):>7}{statistics.median(xs) * 1000:>11.1f}{max(xs) * 1000:>9.1f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer", type=Path, default=Path(".cache/tokenizers/qwen"), help="tokenizer dir"
    )
    parser.add_argument("--rounds", type=int, default=5, help="repetitions per fault (fresh fleet each)")
    parser.add_argument(
        "--cases", nargs="*", choices=CASES, default=list(CASES), help="faults to run (default: all)"
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write the samples (seconds) as JSON")


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print("--rounds must be >= 1", file=sys.stderr)
        return 2
    samples = asyncio.run(measure(args.tokenizer, args.rounds, tuple(args.cases)))
    print(table(samples))
    if args.json:
        args.json.write_text(json.dumps(samples, indent=2) + "\n")
    return 0
