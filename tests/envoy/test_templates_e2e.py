"""Templated requests through a real Envoy, our server and fake vLLM engines (issue #8).

Real: Envoy (the shipped buffered and full-duplex configs), gRPC ext_proc, our ``serve`` server with the
Qwen tokenizer, the fake engines (Qwen tokenizer, prefix cache, KV events), HTTP. The
template reaches the server by ``PUT /templates`` on its controller listener, as the
operator pushes it. We check: the engine gets the rendered request (it counts the
rendered chat's tokens; a forwarded ``template`` field without ``messages`` would be
refused), the second request with another question lands on the same engine and its
engine-reported cache hit covers the template's stable blocks, and an unknown template is
a 404 in the OpenAI error shape that never reaches an engine.
"""

from __future__ import annotations

from typing import Any

import pytest
import template_samples

from inference_cache import render
from inference_cache.extproc import templates
from inference_cache.tokenizer import PromptTokenizer

from .conftest import BS, MODEL, QWEN, Fleet, StartFleet

TENANT = "team-a"
MANUAL = " ".join(f"Runbook rule {k}: restart the worker, then check the queue depth." for k in range(20))
SPEC = template_samples.CHAT_TEMPLATE


async def ask(
    fleet: Fleet, question: str, *, name: str = f"{TENANT}/support"
) -> tuple[int, str, dict[str, Any]]:
    variables = {"persona": "the  on-call\tengineer", "manual": MANUAL, "question": question}
    payload = {"model": MODEL, "max_tokens": 1, "template": {"name": name, "variables": variables}}
    async with fleet.session.post(
        fleet.proxy.url + "/v1/chat/completions",
        json=payload,
        headers={"x-inference-cache-tenant": TENANT},
    ) as response:
        body: dict[str, Any] = await response.json(content_type=None)
        return response.status, response.headers.get("x-engine-address", ""), body


@pytest.mark.parametrize("config", ["buffered", "duplex"])
async def test_a_templated_request_reaches_the_engine_rendered_and_its_stable_prefix_hits(
    start_fleet: StartFleet, config: str
) -> None:
    fleet = await start_fleet(config, engines=2, tenant_header=True)
    (server,) = fleet.servers
    assert server.addresses is not None
    stored = templates.build(TENANT, "support", SPEC)
    async with fleet.session.put(
        f"http://{server.addresses.snapshot}/templates", data=templates.encode([stored])
    ) as r:
        assert r.status == 204, await r.text()

    qwen = PromptTokenizer.load(QWEN)
    stable = render.stable_prefix(
        stored.spec, qwen, BS, variables={"persona": "the on-call engineer", "manual": MANUAL}
    )
    assert len(stable.block_keys) >= 4

    status, first_engine, first = await ask(fleet, "The queue is stuck, what now?")
    assert status == 200, first
    rendered = render.render(
        stored.spec,
        {"persona": "the on-call engineer", "manual": MANUAL, "question": "The queue is stuck, what now?"},
    )
    assert rendered.messages is not None
    messages = [m.to_openai() for m in rendered.messages]
    assert first["usage"]["prompt_tokens"] == len(qwen.encode_chat(messages))
    await fleet.sync()  # the first prompt's blocks are in the index

    status, second_engine, second = await ask(fleet, "And if the worker will not restart?")
    assert status == 200, second
    assert second_engine == first_engine != ""
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= len(stable.block_keys) * BS


async def test_an_unknown_template_is_a_404_that_never_reaches_an_engine(start_fleet: StartFleet) -> None:
    fleet = await start_fleet("buffered", engines=2, tenant_header=True)
    status, engine, body = await ask(fleet, "q", name=f"{TENANT}/missing")
    assert (status, engine) == (404, "")
    assert body["error"]["code"] == "template_not_found"
    assert body["error"]["param"] == "template.name"
