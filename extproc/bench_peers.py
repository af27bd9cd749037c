"""What ``bench extproc`` needs of a real engine and of vllm-router, beyond echoing a chat.

Owner: ``inference_cache.extproc`` (used by :mod:`inference_cache.extproc.bench` only)::

    bench (parent)  --KvEventPublisher, one PUB per echo engine (tcp://127.0.0.1:P)-->
        `inference-cache serve` (endpoints[].kv_events) and vllm-router (--kv-event-source)
    vllm-router kv_aware --POST /v1/chat/completions/render--> echo engine (render_answer)

* **Render / tokenize** (vLLM's answers): the echo engines render the chat template and
  tokenize with the model's tokenizer, in vLLM's ``GenerateRequest`` shape for
  ``/v1/chat/completions/render`` and vLLM's ``/tokenize`` body (what the fake engine
  answers, ``inference_cache.fakeengine.app``).
* **KV events** (what a vLLM engine publishes once it has prefilled a prompt): one
  ``KVEventBatch`` per prompt holding one ``BlockStored`` with the prompt's full blocks, the
  emulated vLLM 0.33's msgpack (``fakeengine.events.encode_batch``) and block hashes
  (``sha256_cbor`` with the default seed, low 64 bits, ``fakeengine.hashing``: vllm-router
  recomputes the same hashes from the rendered token ids; our server re-keys blocks from
  their token ids and needs no hash setting). Frames ``[topic, seq, payload]`` as
  ``fakeengine.publisher`` sends them; the PUB socket binds ``tcp://127.0.0.1:0`` itself
  because vLLM's rule (``publisher.binds``) would *connect* a ``tcp://127.0.0.1`` endpoint,
  and vllm-router accepts only ``tcp://HOST:PORT`` sources.
* **vllm-router** ``--policy kv_aware`` in front of ONE echo engine (its cheapest case: one
  render call per request; the echo engines share one process and one core, so N render
  calls per request would serialise there, which one vLLM per host would not).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zmq
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from inference_cache import envoy
from inference_cache.fakeengine import events, hashing, publisher
from inference_cache.fakeengine.versions import Version
from inference_cache.tokenizer import PromptTokenizer, TemplateError, vllm_chat_tokens

#: The vLLM the events and render answers emulate, and its prefix-caching hash.
VLLM_VERSION: Version = (0, 33, 0)
HASH_ALGO: hashing.HashAlgo = "sha256_cbor"
#: ``--max-model-len`` the echo engines claim (``/tokenize``, the render's default max_tokens).
MAX_MODEL_LEN = 65536
TOPIC = b""
RENDER_PATH = "/v1/chat/completions/render"
TOKENIZE_PATH = "/tokenize"
VLLM_ROUTER = Path(__file__).resolve().parents[1] / ".tools" / "peers" / "vllm-router" / "bin" / "vllm-router"
#: vllm-router's KV lookup counter (``result`` = hit | miss), one per routed request.
ROUTER_LOOKUPS = "vllm_router_kv_placement_lookups"


# -- render / tokenize --------------------------------------------------------------------------


def render_answer(body: Mapping[str, Any], tokens: list[int], model: str) -> dict[str, Any]:
    """vLLM's ``/v1/chat/completions/render`` answer: a ``GenerateRequest``."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "request_id": uuid.uuid4().hex,
        "token_ids": tokens,
        "features": None,
        "sampling_params": {"max_tokens": max_tokens or MAX_MODEL_LEN - len(tokens)},
        "model": body.get("model") or model,
        "stream": bool(body.get("stream", False)),
        "cache_salt": body.get("cache_salt"),
    }


def tokenize_answer(tok: PromptTokenizer, body: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's ``/tokenize`` answer for ``{"messages": ...}`` or ``{"prompt": "..."}``."""
    if "messages" in body:
        tokens = vllm_chat_tokens(tok, body)
    elif isinstance(prompt := body.get("prompt"), str):
        tokens = tok.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))
    else:
        raise TemplateError("prompt must be a string")
    strs = tok.token_strs(tokens) if body.get("return_token_strs") else None
    return {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens, "token_strs": strs}


def add_vllm_routes(app: web.Application, tok: PromptTokenizer, model: str) -> None:
    """``POST /v1/chat/completions/render`` and ``POST /tokenize`` on an echo engine."""

    async def body_of(request: web.Request) -> dict[str, Any]:
        body = await request.json()
        if not isinstance(body, dict):
            raise TemplateError("the body must be a JSON object")
        return body

    def bad(exc: Exception) -> web.Response:
        error = {"message": str(exc), "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response({"error": error}, status=400)

    async def render(request: web.Request) -> web.Response:
        try:
            body = await body_of(request)
            return web.json_response(render_answer(body, vllm_chat_tokens(tok, body), model))
        except (TemplateError, ValueError) as exc:
            return bad(exc)

    async def tokenize(request: web.Request) -> web.Response:
        try:
            return web.json_response(tokenize_answer(tok, await body_of(request)))
        except (TemplateError, ValueError) as exc:
            return bad(exc)

    app.router.add_post(RENDER_PATH, render)
    app.router.add_post(TOKENIZE_PATH, tokenize)


# -- KV events ----------------------------------------------------------------------------------


def block_stored_batch(hasher: hashing.BlockHasher, tokens: Sequence[int], ts: float) -> bytes:
    """The ``KVEventBatch`` a vLLM engine publishes after prefilling ``tokens`` from an empty
    cache: one ``BlockStored`` with every full block (parent ``None``)."""
    full = list(tokens[: len(tokens) // hasher.block_size * hasher.block_size])
    hashes = hasher.extend([], full)
    stored = events.BlockStored(
        block_hashes=[hashing.external(h) for h in hashes],
        parent_block_hash=None,
        token_ids=full,
        block_size=hasher.block_size,
    )
    return events.encode_batch(VLLM_VERSION, ts, [stored])


class KvEventPublisher:
    """One engine's KV-event PUB socket, bound on loopback (``endpoint``: where to connect)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], block_size: int) -> None:
        self._sock = context.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{envoy.LOOPBACK}:0")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._hasher = hashing.BlockHasher.create(HASH_ALGO, None, block_size, VLLM_VERSION)
        self._seq = 0

    def stored(self, tokens: Sequence[int]) -> None:
        """Publish that this engine now caches the full blocks of ``tokens``."""
        payload = block_stored_batch(self._hasher, tokens, time.time())
        self._sock.send_multipart([TOPIC, publisher.seq_bytes(self._seq), payload])
        self._seq += 1

    def close(self) -> None:
        self._sock.close(linger=0)


class KvEvents:
    """A PUB socket per engine address (a context manager: closes them all)."""

    def __init__(self, addresses: Sequence[str], block_size: int) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.publishers: dict[str, KvEventPublisher] = {}
        try:
            for address in addresses:
                self.publishers[address] = KvEventPublisher(self._ctx, block_size)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> KvEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def endpoint(self, address: str) -> str:
        return self.publishers[address].endpoint

    def close(self) -> None:
        for pub in self.publishers.values():
            pub.close()
        self.publishers.clear()
        self._ctx.term()


# -- vllm-router ---------------------------------------------------------------------------------


def vllm_router_command(
    exe: Path,
    *,
    port: int,
    metrics_port: int,
    worker: str,
    events_endpoint: str,
    model: str,
    block_size: int,
    tokenizer: Path,
    pin: bool,
) -> tuple[list[str], dict[str, str]]:
    """vllm-router ``kv_aware`` in front of one worker (``host:port``) whose KV events are
    published at ``events_endpoint``; -> command line and extra environment."""
    url = f"http://{worker}"
    cmd = [
        str(exe), "--host", envoy.LOOPBACK, "--port", str(port), "--worker-urls", url,
        "--policy", "kv_aware", "--kv-event-source", f"{url}={events_endpoint}",
        "--kv-event-model", model, "--kv-event-block-size", str(block_size),
        "--prometheus-host", envoy.LOOPBACK, "--prometheus-port", str(metrics_port),
        "--log-level", "warning",
    ]  # fmt: skip
    return (["taskset", "-c", "0", *cmd] if pin else cmd), {"VLLM_ROUTER_TOKENIZER": str(tokenizer)}


def router_lookups(text: str) -> dict[str, float]:
    """``result`` -> count of vllm-router's KV placement lookups in a ``/metrics`` text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == ROUTER_LOOKUPS:
            for s in family.samples:
                if s.name.endswith("_total"):
                    result = s.labels.get("result", "")
                    out[result] = out.get(result, 0.0) + s.value
    return out
