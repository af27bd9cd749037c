"""Template warm-up (``extproc/warmup.py``) with real fake engines and the real server.

Real: the fake vLLM engines (prefix cache, KV events over ipc://, HTTP), our ``serve``
server in-process (``PUT /templates`` on its controller listener, the endpoint picker), the
Qwen tokenizer when ``make tokenizer`` has run, else the tiny test tokenizer. We check that
after the warm-up the engine the picker chooses holds the template's stable prefix: the
first real templated request (picked by the picker, its rewritten body sent to the chosen
engine) reports ``cached_tokens`` equal to the stable blocks; without the warm-up it
reports none. Plus: the config's templates are warmed at start, a revision is warmed once,
failures are counted and retried on the next change, and ``PUT /templates`` never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inference_cache import config as config_mod
from inference_cache import demo, render
from inference_cache.extproc import templates, warmup
from inference_cache.extproc.picking import Decision, PickRequest
from inference_cache.tokenizer import PromptTokenizer

ROOT = Path(__file__).resolve().parents[2]
QWEN = ROOT / ".cache" / "tokenizers" / "qwen"
TINY = ROOT / "tests" / "data" / "tiny-tokenizer"
TOKENIZER = QWEN if (QWEN / "tokenizer.json").is_file() else TINY
BS = 16
TENANT = "demo"
SYSTEM = "You are the support desk of a storage company. " + " ".join(
    f"Rule {k}: check the replication lag before restarting node {k}." for k in range(12)
)
CHAT: dict[str, Any] = {
    "messages": [{"role": "system", "body": SYSTEM}, {"role": "user", "body": "{{.question}}"}],
    "slots": [{"name": "question", "type": "Mutable", "required": True}],
}
TEXT: dict[str, Any] = {
    "body": SYSTEM + "\n\nQuestion: {{.question}}\nAnswer:",
    "slots": [{"name": "question", "type": "Mutable", "required": True}],
}

Start = Callable[..., Awaitable[demo.Cluster]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            *,
            engines: int = 3,
            warm: config_mod.WarmupSettings | None = None,
            initial: tuple[config_mod.TemplateConfig, ...] = (),
        ) -> demo.Cluster:
            """Engines and a server; without ``initial`` templates, once the server has the
            engines' events (``connect`` pings lagging engines with ``/reset_prefix_cache``,
            which would wipe what a warm-up at start pre-filled)."""
            settings = demo.DemoSettings(
                tokenizer=TOKENIZER, engines=engines, num_gpu_blocks=320, tenant=TENANT
            )
            running = await demo.start_engines(settings, stack)
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            )
            cluster = await demo.attach_server(
                settings, running, session, stack, warmup=warm, templates=initial
            )
            if not initial:
                await cluster.connect(10)
            return cluster

        yield start


def stored(spec: dict[str, Any], name: str = "support") -> templates.StoredTemplate:
    return templates.build(TENANT, name, spec)


def stable(t: templates.StoredTemplate) -> render.StablePrefix:
    return warmup.known_prefix(t.spec, PromptTokenizer.load(TOKENIZER), BS)


async def ask(cluster: demo.Cluster, t: templates.StoredTemplate, question: str) -> tuple[str, int]:
    """The first real templated request: picked by the server's picker, its rewritten body
    sent to the chosen engine -> (engine name, the engine's ``cached_tokens``)."""
    path = "/v1/chat/completions" if t.spec.is_chat else "/v1/completions"
    body = {
        "model": demo.MODEL,
        "max_tokens": 1,
        "template": {"name": t.ref, "variables": {"question": question}},
    }
    decision = await cluster.server.picker.pick(PickRequest("POST", path, {}, json.dumps(body).encode()))
    assert isinstance(decision, Decision), decision
    assert decision.body is not None
    url = f"http://{decision.endpoints[0]}{path}"
    async with cluster.session.post(
        url, data=decision.body, headers={"content-type": "application/json"}
    ) as r:
        answer = await r.json()
        assert r.status == 200, answer
    return cluster.name_of(decision.endpoints[0]), answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def holders(cluster: demo.Cluster, prefix: render.StablePrefix) -> list[str]:
    """Engines holding every full stable block (``held`` caps at the last token, so one
    more token than the stable blocks)."""
    full = len(prefix.block_keys) * BS
    ids = [*prefix.token_ids[:full], 0]
    return [n for n in cluster.engines if cluster.held(n, ids) == full]


def count(cluster: demo.Cluster, result: str) -> float:
    value = cluster.server.metrics.registry.get_sample_value(
        "inferencecache_template_warmups_total", {"result": result}
    )
    return value or 0.0


@pytest.mark.parametrize(("spec", "replicas"), [(CHAT, 1), (TEXT, 2)], ids=["chat", "text"])
async def test_after_warm_up_the_first_templated_request_hits_the_stable_blocks(
    start: Start, spec: dict[str, Any], replicas: int
) -> None:
    cluster = await start(warm=config_mod.WarmupSettings(enabled=True, replicas=replicas))
    t = stored(spec)
    prefix = stable(t)
    assert len(prefix.block_keys) >= 4
    await cluster.put_templates([t])
    assert cluster.server.warmer is not None
    await cluster.server.warmer.settled()
    await cluster.wait_ingested(10)
    warm = holders(cluster, prefix)
    assert len(warm) == replicas
    assert count(cluster, warmup.RESULT_OK) == replicas

    engine, cached = await ask(cluster, t, "Node 3 will not rejoin the cluster, what now?")
    assert engine in warm
    assert cached == len(prefix.block_keys) * BS


async def test_without_warm_up_the_first_templated_request_misses(start: Start) -> None:
    cluster = await start()
    t = stored(CHAT)
    await cluster.put_templates([t])
    assert cluster.server.warmer is None
    assert holders(cluster, stable(t)) == []
    _engine, cached = await ask(cluster, t, "Node 3 will not rejoin the cluster, what now?")
    assert cached == 0


async def test_the_configs_templates_are_warmed_at_start_and_a_revision_only_once(start: Start) -> None:
    initial = (config_mod.TemplateConfig(TENANT, "support", CHAT),)
    cluster = await start(warm=config_mod.WarmupSettings(enabled=True), initial=initial)
    assert cluster.server.warmer is not None
    await cluster.server.warmer.settled()
    t = stored(CHAT)
    assert len(holders(cluster, stable(t))) == 1
    assert count(cluster, warmup.RESULT_OK) == 1

    await cluster.put_templates([t])  # the same revision again: nothing to do
    await cluster.server.warmer.settled()
    assert count(cluster, warmup.RESULT_OK) == 1

    changed = stored(
        {**CHAT, "messages": [{"role": "system", "body": SYSTEM + " Be brief."}, CHAT["messages"][1]]}
    )
    assert changed.revision != t.revision
    await cluster.put_templates([changed])  # a new revision is warmed
    await cluster.server.warmer.settled()
    assert count(cluster, warmup.RESULT_OK) == 2
    assert len(holders(cluster, stable(changed))) == 1


async def test_a_template_its_tenant_cannot_use_and_a_short_one_are_not_sent(start: Start) -> None:
    cluster = await start(warm=config_mod.WarmupSettings(enabled=True))
    other = templates.build("team-b", "support", CHAT)
    short = stored({"body": "Q: {{.question}}", "slots": CHAT["slots"]}, name="short")
    await cluster.put_templates([other, short])
    assert cluster.server.warmer is not None
    await cluster.server.warmer.settled()
    assert count(cluster, warmup.RESULT_SHORT) == 1
    assert count(cluster, warmup.RESULT_OK) == count(cluster, warmup.RESULT_FAILED) == 0
    assert holders(cluster, stable(other)) == []


class HeldEngine:
    """An engine whose ``/v1/completions`` waits for :attr:`release`, then answers ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"error": "engine down"}, status=self.status)


async def test_put_templates_never_waits_and_a_failure_is_counted_then_retried() -> None:
    engine = HeldEngine(status=503)
    app = web.Application()
    app.router.add_post("/v1/completions", engine.handle)
    app.router.add_get("/health", engine.health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = config_mod.Config(
        server=config_mod.ServerSettings(
            grpc_bind_address="127.0.0.1:0",
            http_bind_address="127.0.0.1:0",
            snapshot_bind_address="127.0.0.1:0",
            extproc_bind_address="127.0.0.1:0",
            insecure_disable_auth=True,
        ),
        models=(config_mod.ModelConfig(name=demo.MODEL, block_size=BS, tokenizer=str(TOKENIZER)),),
        endpoints=(config_mod.EndpointConfig(address=f"127.0.0.1:{port}", model=demo.MODEL, tenant=TENANT),),
        health_interval_s=3600,
        warmup=config_mod.WarmupSettings(enabled=True),
    )
    server = demo.Server(config)
    await server.start()
    try:
        assert server.addresses is not None and server.warmer is not None
        t = stored(CHAT)
        async with aiohttp.ClientSession() as session:
            url = f"http://{server.addresses.snapshot}/templates"
            async with session.put(url, data=templates.encode([t])) as r:
                assert r.status == 204
            # the PUT has answered; the warm-up is in flight
            await asyncio.wait_for(engine.arrived.wait(), 10)
            prefix = stable(t)
            assert engine.bodies == [
                {"model": demo.MODEL, "prompt": prefix.text, "max_tokens": 1, "add_special_tokens": False}
            ]
            engine.release.set()
            await server.warmer.settled()
            registry = server.metrics.registry
            failed = {"result": warmup.RESULT_FAILED}
            assert registry.get_sample_value("inferencecache_template_warmups_total", failed) == 1
            async with session.put(url, data=templates.encode([t])) as r:  # tried again
                assert r.status == 204
            await server.warmer.settled()
            assert registry.get_sample_value("inferencecache_template_warmups_total", failed) == 2
            assert len(engine.bodies) == 2
    finally:
        engine.release.set()
        await server.stop(0.1)
        await runner.cleanup()


def test_the_known_prefix_stops_at_the_first_slot_of_any_kind() -> None:
    tok = PromptTokenizer.load(TOKENIZER)
    spec = render.TemplateSpec.from_dict(
        {
            "body": "Instructions that never change. {{.persona}} then {{.question}}",
            "slots": [
                {"name": "persona", "type": "Stable", "required": True},
                {"name": "question", "type": "Mutable"},
            ],
        }
    )
    assert warmup.known_prefix(spec, tok, BS).text == "Instructions that never change. "
    literal = render.TemplateSpec.from_dict(TEXT)
    assert warmup.known_prefix(literal, tok, BS) == render.stable_prefix(literal, tok, BS)


def test_the_warmup_section_is_decoded_strictly() -> None:
    assert config_mod.parse("").warmup == config_mod.WarmupSettings(enabled=False, replicas=1)
    cfg = config_mod.parse("warmup: {enabled: true, replicas: 2, max_concurrency: 8, timeout_s: 5}")
    assert cfg.warmup == config_mod.WarmupSettings(True, 2, 8, 5.0)
    for text, message in (
        ("warmup: {replicas: 0}", "warmup.replicas: must be >= 1"),
        ("warmup: {max_concurrency: 0}", "warmup.max_concurrency: must be >= 1"),
        ("warmup: {timeout_s: 0}", "warmup.timeout_s: must be > 0"),
        ("warmup: {replica: 1}", "warmup.replica: unknown key"),
    ):
        with pytest.raises(config_mod.ConfigError, match=message):
            config_mod.parse(text)
