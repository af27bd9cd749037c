"""Every HTTP endpoint of a real fake-engine server on 127.0.0.1 port 0, with its KV events
read over real ZMQ (ipc:// in tmp_path): completions and chat (JSON and SSE), truthful
``cached_tokens``, tokenize and render, models, health, metrics, reset, faults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from inference_cache.fakeengine import main
from inference_cache.fakeengine.main import EngineConfig, Running
from inference_cache.fakeengine.scheduler import TimeModel
from inference_cache.tokenizer import PromptTokenizer

from .conftest import TINY_TOKENIZER

LONG = "You are a helpful assistant. Answer the question briefly and truthfully. " * 3


def config(tmp_path: Path, **kw: Any) -> EngineConfig:
    base = EngineConfig(
        tokenizer=TINY_TOKENIZER,
        model="tiny",
        port=0,
        kv_events_endpoint=f"ipc://{tmp_path}/kv",
        replay_endpoint=f"ipc://{tmp_path}/replay",
        kv_events_topic="kv",
        hash_algo="sha256_cbor",
        python_hash_seed="0",
        time_model=TimeModel(prefill_tokens_per_second=1e7, decode_tokens_per_second=1e5, max_num_seqs=8),
        lora_modules=(("ad", "/adapters/ad"),),
    )
    return replace(base, **kw)


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
async def server(tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]]) -> AsyncIterator[Running]:
    running = await main.start(config(tmp_path), zmq_context=zctx)
    yield running
    await running.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Events:
    """A SUB socket on the server's stream, joined before the test starts (probe batches
    go through ``/reset_prefix_cache`` and are swallowed)."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def next(self) -> tuple[int, list[Any]]:
        topic, seq, payload = await asyncio.wait_for(self.sock.recv_multipart(), 5)
        assert topic == b"kv"
        return int.from_bytes(seq, "big"), msgpack.unpackb(payload)

    async def idle(self) -> bool:
        return not await self.sock.poll(50)


@pytest.fixture
async def kv(
    server: Running, zctx: zmq.Context[zmq.Socket[bytes]], http: aiohttp.ClientSession
) -> AsyncIterator[Events]:
    actx = zmq.asyncio.Context.shadow(zctx.underlying)
    sock = actx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"kv")
    assert server.publisher is not None
    sock.connect(server.publisher.endpoint)
    for _ in range(250):
        async with http.post(f"{server.url}/reset_prefix_cache") as r:
            assert r.status == 200
        if await sock.poll(20):
            break
    else:
        pytest.fail("subscription never arrived")
    while await sock.poll(20):
        await sock.recv_multipart()
    yield Events(sock)
    sock.close(linger=0)


async def post(
    http: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json(content_type=None), r.headers


def tokenizer() -> PromptTokenizer:
    return PromptTokenizer.load(TINY_TOKENIZER)


async def test_completion_usage_and_cached_tokens(
    server: Running, http: aiohttp.ClientSession, kv: Events
) -> None:
    status, body, headers = await post(
        http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 5}
    )
    assert status == 200 and headers["x-engine-address"] == f"127.0.0.1:{server.port}"
    n = len(tokenizer().encode(LONG))
    assert body["usage"] == {
        "prompt_tokens": n,
        "total_tokens": n + 5,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    _, batch = await kv.next()
    (stored,) = batch[1]
    assert stored["type"] == "BlockStored" and len(stored["block_hashes"]) == n // 16
    status, again, _ = await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 5})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == ((n - 1) // 16) * 16
    assert again["choices"][0]["text"] == body["choices"][0]["text"]  # deterministic filler


async def test_completion_prompt_forms(server: Running, http: aiohttp.ClientSession) -> None:
    url = f"{server.url}/v1/completions"
    _, many, _ = await post(http, url, {"prompt": ["a b c", "d e f"], "max_tokens": 2})
    assert [c["index"] for c in many["choices"]] == [0, 1]
    _, ids, _ = await post(http, url, {"prompt": [5, 6, 7, 8], "max_tokens": 2})
    assert ids["usage"]["prompt_tokens"] == 4
    _, nested, _ = await post(http, url, {"prompt": [[5, 6], [7, 8, 9]], "max_tokens": 1})
    assert nested["usage"]["prompt_tokens"] == 5
    status, err, _ = await post(http, url, {"prompt": {"x": 1}})
    assert status == 400 and err["error"]["code"] == 400
    status, err, _ = await post(http, url, {"prompt": "x", "model": "nope"})
    assert status == 404 and err["error"]["type"] == "NotFoundError"
    status, err, _ = await post(http, url, {"prompt": "x", "max_tokens": 5000})
    assert status == 400


async def sse(
    http: aiohttp.ClientSession, url: str, body: Any
) -> tuple[list[Any], aiohttp.typedefs.LooseHeaders]:
    chunks: list[Any] = []
    async with http.post(url, json=body) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                chunks.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        return chunks, r.headers


async def test_completion_stream(server: Running, http: aiohttp.ClientSession) -> None:
    body = {"prompt": LONG, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    chunks, headers = await sse(http, f"{server.url}/v1/completions", body)
    assert headers["x-engine-address"] == f"127.0.0.1:{server.port}"
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 4
    texts = [c["choices"][0]["text"] for c in chunks[:-2] if c["choices"][0]["finish_reason"] is None]
    assert len(texts) == 4
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    _, plain, _ = await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 4})
    assert "".join(texts) == plain["choices"][0]["text"]


async def test_chat_and_stream(server: Running, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": "hello"}]
    expected = tokenizer().encode_chat(messages)
    _, body, _ = await post(
        http, f"{server.url}/v1/chat/completions", {"messages": messages, "max_tokens": 3}
    )
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(expected)
    assert body["choices"][0]["message"]["role"] == "assistant"
    chunks, _ = await sse(
        http,
        f"{server.url}/v1/chat/completions",
        {"messages": messages, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert content == body["choices"][0]["message"]["content"]
    assert chunks[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == ((len(expected) - 1) // 16) * 16
    no_usage, _ = await sse(http, f"{server.url}/v1/chat/completions", {"messages": messages, "stream": True})
    assert all(c == "[DONE]" or c["choices"] for c in no_usage)


async def test_tokenize_and_render(server: Running, http: aiohttp.ClientSession) -> None:
    tok = tokenizer()
    messages = [{"role": "user", "content": "hello there"}]
    _, t, _ = await post(http, f"{server.url}/tokenize", {"prompt": LONG})
    assert t == {
        "count": len(tok.encode(LONG)),
        "max_model_len": 4096,
        "tokens": tok.encode(LONG),
        "token_strs": None,
    }
    _, c, _ = await post(http, f"{server.url}/tokenize", {"messages": messages, "return_token_strs": True})
    assert c["tokens"] == tok.encode_chat(messages) and c["token_strs"][0] == "<|im_start|>"
    _, r, _ = await post(
        http, f"{server.url}/v1/chat/completions/render", {"messages": messages, "max_tokens": 7}
    )
    assert (
        r["token_ids"] == c["tokens"] and r["sampling_params"] == {"max_tokens": 7} and r["model"] == "tiny"
    )
    _, rc, _ = await post(
        http, f"{server.url}/v1/completions/render", {"prompt": ["a", LONG], "cache_salt": "s"}
    )
    assert [x["token_ids"] for x in rc] == [tok.encode("a"), tok.encode(LONG)] and rc[0]["cache_salt"] == "s"


async def test_models_health_metrics(server: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{server.url}/v1/models") as r:
        models = await r.json()
    assert [(m["id"], m["parent"]) for m in models["data"]] == [("tiny", None), ("ad", "tiny")]
    async with http.get(f"{server.url}/health") as r:
        assert r.status == 200 and r.headers["x-engine-address"] == f"127.0.0.1:{server.port}"
    await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    n = len(tokenizer().encode(LONG))
    labels = '{engine="0",model_name="tiny"}'
    assert f"vllm:num_requests_running{labels} 0.0" in text
    assert f"vllm:num_requests_waiting{labels} 0.0" in text
    assert f"vllm:prefix_cache_queries_total{labels} {float(2 * n)}" in text
    assert f"vllm:prefix_cache_hits_total{labels} {float(((n - 1) // 16) * 16)}" in text
    assert "vllm:kv_cache_usage_perc" in text
    assert 'vllm:cache_config_info{block_size="16"' in text


async def test_lora_and_salt_reach_the_events(
    server: Running, http: aiohttp.ClientSession, kv: Events
) -> None:
    await post(
        http,
        f"{server.url}/v1/completions",
        {"prompt": LONG, "max_tokens": 1, "model": "ad", "cache_salt": "t"},
    )
    _, batch = await kv.next()
    stored = batch[1][0]
    assert (stored["lora_id"], stored["lora_name"]) == (1, "ad")
    assert stored["extra_keys"][0] == ["ad", "t"] and stored["extra_keys"][1] == ["ad"]


async def test_reset_prefix_cache(server: Running, http: aiohttp.ClientSession, kv: Events) -> None:
    await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    await kv.next()
    async with http.post(f"{server.url}/reset_prefix_cache") as r:
        assert r.status == 200
    _, batch = await kv.next()
    assert batch[1] == [{"type": "AllBlocksCleared"}]
    _, body, _ = await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_fault_drop_batches(server: Running, http: aiohttp.ClientSession, kv: Events) -> None:
    assert server.publisher is not None
    dropped = server.publisher.next_seq
    status, body, _ = await post(http, f"{server.url}/_fault", {"drop_batches": 1})
    assert status == 200 and body == {"ok": True}
    await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    await post(http, f"{server.url}/v1/completions", {"prompt": "The quick brown fox " * 8, "max_tokens": 1})
    seq, _ = await kv.next()
    assert seq == dropped + 1  # a gap: the subscriber never saw `dropped`
    assert await kv.idle()


async def test_fault_restart_publisher(server: Running, http: aiohttp.ClientSession, kv: Events) -> None:
    await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    await kv.next()
    status, _, _ = await post(http, f"{server.url}/_fault", {"restart_publisher": True})
    assert status == 200
    _, body, _ = await post(http, f"{server.url}/v1/completions", {"prompt": LONG, "max_tokens": 1})
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # cache cleared
    seq, batch = await kv.next()
    assert seq == 0 and batch[1][0]["type"] == "BlockStored"


async def test_fault_validation(server: Running, http: aiohttp.ClientSession) -> None:
    status, _, _ = await post(http, f"{server.url}/_fault", {"drop_batches": -1})
    assert status == 400
    status, _, _ = await post(http, f"{server.url}/_fault", {"explode": True})
    assert status == 400
    status, _, _ = await post(http, f"{server.url}/_fault", {"stall_s": 0.01})
    assert status == 200


async def test_request_larger_than_the_cache(
    tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]], http: aiohttp.ClientSession
) -> None:
    running = await main.start(config(tmp_path, num_gpu_blocks=4), zmq_context=zctx)  # 3 blocks of 16
    try:
        url = f"{running.url}/v1/completions"
        status, err, headers = await post(http, url, {"prompt": ["a", LONG * 2], "max_tokens": 2})
        assert status == 400 and "KV blocks" in err["error"]["message"] and "x-engine-address" in headers
        assert running.engine.num_running == 0 and running.engine.num_waiting == 0
        status, err, _ = await post(http, url, {"prompt": LONG * 2, "stream": True})
        assert status == 400 and "KV blocks" in err["error"]["message"]  # refused before the stream
        status, _, _ = await post(http, url, {"prompt": "a", "max_tokens": 2})
        assert status == 200
    finally:
        await running.close()


async def test_stream_chunks_leave_before_the_request_ends(
    tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]], http: aiohttp.ClientSession
) -> None:
    """Each SSE chunk is written when its token is produced, not at the end of the stream."""
    slow = TimeModel(prefill_tokens_per_second=1e7, decode_tokens_per_second=50.0, max_num_seqs=4)
    running = await main.start(config(tmp_path, time_model=slow), zmq_context=zctx)
    try:
        body = {"prompt": "a b c", "max_tokens": 5, "stream": True}
        async with http.post(f"{running.url}/v1/completions", json=body) as r:
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            assert running.engine.num_running == 1  # the request is still decoding
            rest = await r.content.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
    finally:
        await running.close()
