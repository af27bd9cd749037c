"""The ``fake-engine`` subcommand: flags through the real CLI parser, refusal of what is not
emulated, a real process that serves and stops on SIGTERM, and an old-version engine whose
events and replay use that version's wire form."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import msgpack
import zmq
import zmq.asyncio

from inference_cache import cli
from inference_cache.fakeengine import main
from inference_cache.fakeengine.scheduler import TimeModel

from .conftest import TINY_TOKENIZER


def parse(*argv: str) -> main.EngineConfig:
    args = cli.build_parser(["fake-engine", *argv]).parse_args(["fake-engine", *argv])
    return main.config_from_args(args)


def test_flags() -> None:
    cfg = parse(
        "--tokenizer", str(TINY_TOKENIZER), "--port", "0", "--vllm-version", "0.23", "--hash-algo", "xxhash",
        "--python-hash-seed", "0", "--kv-events-endpoint", "tcp://*:5557", "--replay-endpoint", "tcp://*:5558",
        "--kv-events-topic", "t", "--buffer-steps", "5", "--prefill-tokens-per-second", "100",
        "--decode-tokens-per-second", "10", "--max-num-seqs", "2", "--data-parallel-rank", "1",
        "--lora-modules", "a=/p/a", "b=/p/b", "--num-gpu-blocks", "100", "--block-size", "32",
        "--prefill-sharing", "fcfs",
    )  # fmt: skip
    assert cfg.vllm_version == (0, 23, 0) and cfg.hash_algo == "xxhash" and cfg.python_hash_seed == "0"
    assert cfg.time_model == TimeModel(100.0, 10.0, 2, "fcfs")
    assert cfg.lora_modules == (("a", "/p/a"), ("b", "/p/b")) and cfg.data_parallel_rank == 1
    assert (cfg.block_size, cfg.num_gpu_blocks, cfg.buffer_steps, cfg.kv_events_topic) == (32, 100, 5, "t")
    default = parse("--tokenizer", str(TINY_TOKENIZER))
    assert default.time_model == TimeModel()
    assert (default.host, default.vllm_version, default.hash_algo, default.python_hash_seed) == (
        "127.0.0.1",
        (0, 33, 0),
        "sha256",
        None,
    )


def test_unemulated_hashing_is_refused() -> None:
    args = cli.build_parser(["fake-engine"]).parse_args(
        ["fake-engine", "--tokenizer", str(TINY_TOKENIZER), "--vllm-version", "0.9"]
    )
    assert main.run(args) == 2


async def test_process_serves_and_stops(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inference_cache", "fake-engine",
        "--tokenizer", str(TINY_TOKENIZER), "--port", "0", "--kv-events-endpoint", f"ipc://{tmp_path}/kv",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        url = re.search(rb"on (http://\S+);", line)
        assert url, line
        async with aiohttp.ClientSession() as http, http.get(f"{url[1].decode()}/health") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_vllm_023_wire(tmp_path: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    actx = zmq.asyncio.Context.shadow(ctx.underlying)
    cfg = main.EngineConfig(
        tokenizer=TINY_TOKENIZER,
        port=0,
        kv_events_endpoint=f"ipc://{tmp_path}/kv",
        replay_endpoint=f"ipc://{tmp_path}/replay",
        vllm_version=(0, 23, 0),
        python_hash_seed="0",
        time_model=TimeModel(1e7, 1e5, 4),
    )
    running = await main.start(cfg, zmq_context=ctx)
    dealer = actx.socket(zmq.DEALER)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"prompt": list(range(3, 40)), "max_tokens": 1}
            async with http.post(f"{running.url}/v1/completions", json=body) as r:
                assert r.status == 200
        assert running.publisher is not None
        dealer.connect(running.publisher.replay_endpoint or "")
        await dealer.send_multipart([b"", bytes(8)])
        first = await asyncio.wait_for(dealer.recv_multipart(), 5)
        end = await asyncio.wait_for(dealer.recv_multipart(), 5)
        assert len(first) == 3 and first[1] == bytes(8)  # [b"", seq, payload]: 2-frame replies
        assert end == [b"", b"\xff" * 8, b""]
        ts, events, rank = msgpack.unpackb(first[2])
        assert rank == 0 and isinstance(ts, float)
        stored = events[0]
        assert stored[0] == "BlockStored" and len(stored) == 12  # array form, every field
        assert stored[3] == list(range(3, 35)) and stored[8:11] == [[None, None], 0, "full_attention"]
    finally:
        dealer.close(linger=0)
        await running.close()
        ctx.term()
