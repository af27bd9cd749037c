"""Helpers for the KV-event tests: a recording sink, event encoders (vLLM map form and
SGLang 0.5.23 structs, encoded in field-declaration order like msgspec does), and a
fake engine publisher speaking vLLM's ZMQ protocol over real sockets."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import vllm_samples
import zmq
import zmq.asyncio

from inference_cache.index.types import Scope

DATA = vllm_samples.KV_EVENTS
END = (-1).to_bytes(8, "big", signed=True)


# -- sink --------------------------------------------------------------------------------------


@dataclass
class RecordingSink:
    """Records every call and keeps the resulting per-replica key set."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    held: dict[str, dict[bytes, tuple[Scope, int]]] = field(default_factory=dict)

    def blocks_stored(
        self,
        scope: Scope,
        replica_id: str,
        keys: Sequence[bytes],
        token_counts: Sequence[int],
        ts: float | None = None,
    ) -> None:
        self.calls.append(("stored", scope, replica_id, list(keys), list(token_counts), ts))
        held = self.held.setdefault(replica_id, {})
        for k, n in zip(keys, token_counts, strict=True):
            held[k] = (scope, n)

    def blocks_removed(self, scope: Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        self.calls.append(("removed", scope, replica_id, list(keys)))
        for k in keys:
            del self.held[replica_id][k]

    def replica_cleared(self, replica_id: str, *, model: str, tenant: str) -> None:
        self.calls.append(("cleared", replica_id, model, tenant))
        self.held.pop(replica_id, None)

    def stored(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == "stored"]

    def keys(self, replica_id: str = "r1") -> set[bytes]:
        return set(self.held.get(replica_id, {}))


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


# -- encoders ----------------------------------------------------------------------------------


def vllm_stored(
    hashes: Sequence[int | bytes],
    parent: int | bytes | None,
    tokens: Sequence[int],
    *,
    block_size: int = 16,
    lora_id: int | None = None,
    medium: str | None = "GPU",
    lora_name: str | None = None,
    extra_keys: list[Any] | None = None,
    group_idx: int | None = None,
    kv_cache_spec_kind: str | None = None,
) -> dict[str, Any]:
    """vLLM >= 0.24 map form: fields without default always present, defaults omitted."""
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": list(hashes),
        "parent_block_hash": parent,
        "token_ids": list(tokens),
        "block_size": block_size,
        "lora_id": lora_id,
        "medium": medium,
        "lora_name": lora_name,
    }
    for k, v in (
        ("extra_keys", extra_keys),
        ("group_idx", group_idx),
        ("kv_cache_spec_kind", kv_cache_spec_kind),
    ):
        if v is not None:
            ev[k] = v
    return ev


def vllm_removed(
    hashes: Sequence[int | bytes], *, medium: str | None = "GPU", group_idx: int | None = None
) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": medium}
    if group_idx is not None:
        ev["group_idx"] = group_idx
    return ev


CLEARED: dict[str, Any] = {"type": "AllBlocksCleared"}


def sglang_stored(
    hashes: Sequence[int],
    parent: int | None,
    tokens: Sequence[int],
    *,
    block_size: int = 1,
    lora_id: int | None = None,
    medium: str | None = None,
    cache_salt: str | None = None,
    session_id: str | None = None,
    lora_name: str | None = None,
) -> dict[str, Any]:
    """SGLang 0.5.23 ``BlockStored`` (tagged map, omit_defaults), declaration order:
    block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium=None,
    cache_salt=None, session_id=None, lora_name=None."""
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": list(hashes),
        "parent_block_hash": parent,
        "token_ids": list(tokens),
        "block_size": block_size,
        "lora_id": lora_id,
    }
    optional = (
        ("medium", medium),
        ("cache_salt", cache_salt),
        ("session_id", session_id),
        ("lora_name", lora_name),
    )
    for k, v in optional:
        if v is not None:
            ev[k] = v
    return ev


def sglang_removed(hashes: Sequence[int], *, medium: str | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": list(hashes)}
    if medium is not None:
        ev["medium"] = medium
    return ev


def batch(events: Sequence[Any], *, ts: float = 1_700_000_000.0, rank: int | None = 0) -> bytes:
    """``[ts, events, rank]`` (vLLM ``data_parallel_rank`` / SGLang ``attn_dp_rank``)."""
    out = msgpack.packb([ts, list(events), rank])
    assert isinstance(out, bytes)
    return out


# -- waiting -----------------------------------------------------------------------------------


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a real condition with a bounded deadline (I/O on real sockets)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        await asyncio.sleep(0.005)


# -- fake engine -------------------------------------------------------------------------------


class FakePublisher:
    """vLLM's ``ZmqEventPublisher`` on real sockets: PUB stream ``[topic, seq, payload]``
    (an XPUB so tests can wait for the subscription instead of sleeping), ROUTER replay
    answering 2-frame (vLLM <= 0.25) or 3-frame (>= 0.26) replies + the -1 end marker,
    a bounded buffer of recent batches."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        *,
        replay: str | None = None,
        connect: bool = False,
        topic: str = "kv-events",
        replay_frames: int = 3,
        buffer_steps: int = 100,
    ) -> None:
        self.topic = topic.encode()
        self.replay_frames = replay_frames
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self.seq = 0
        self.replay_requests: list[int] = []
        self.pub = ctx.socket(zmq.XPUB)
        try:
            if connect:
                self.pub.connect(endpoint)
            else:
                self.pub.bind(endpoint)
        except zmq.ZMQError:
            self.pub.close(linger=0)
            raise
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT) if not connect else endpoint
        self.router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self._task: asyncio.Task[None] | None = None
        if replay is not None:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.bind(replay)
            self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._task = asyncio.create_task(self._serve_replay())

    async def wait_subscribed(self) -> None:
        msg = await asyncio.wait_for(self.pub.recv(), 5.0)
        assert msg[:1] == b"\x01"

    async def publish(self, payload: bytes, *, send: bool = True) -> int:
        """Buffer and (unless ``send`` is False: lost on the wire) publish one batch."""
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if send:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """A new engine process: sequence from 0, empty buffer."""
        self.seq = 0
        self.buffer.clear()

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            ident, empty, start_b = await self.router.recv_multipart()
            start = int.from_bytes(start_b, "big")
            self.replay_requests.append(start)
            for seq, payload in list(self.buffer):
                if seq >= start:
                    body = [seq.to_bytes(8, "big"), payload]
                    if self.replay_frames == 3:
                        body.insert(0, self.topic)
                    await self.router.send_multipart([ident, empty, *body])
            end = [END, b""] if self.replay_frames == 2 else [b"", END, b""]
            await self.router.send_multipart([ident, empty, *end])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)  # never hang the suite on a socket a failing test left open
