"""The endpoint picker over a real index and the tiny tokenizer: what each request gets.

No Envoy here (``tests/envoy/test_picker_e2e.py`` has that): ``PickRequest``s go straight
to ``EndpointPicker.pick``; the index is fed through its KV-event sink with the keys an
engine's events would produce (our fingerprint of the same token ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import template_samples

from inference_cache import config, render, tokenizer
from inference_cache.extproc import openai, picker, serve, templates
from inference_cache.extproc.picking import Decision, ErrorKind, Outcome, PickRequest, Rejection
from inference_cache.extproc.scoring import ScoringSettings
from inference_cache.index import bytekeys, fingerprint, policy, store, types

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
MODEL = "m"
BS = 16
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_picker(
    *,
    tokenizer_dir: Path | None = TINY,
    events: bool = True,
    ready: set[str] | None = None,
    policies: list[policy.NamespacePolicy] | None = None,
    **settings: Any,
) -> tuple[picker.EndpointPicker, store.Index]:
    cfg = config.Config(
        models=(
            config.ModelConfig(
                MODEL,
                block_size=BS,
                tokenizer=str(tokenizer_dir) if tokenizer_dir else None,
                lora_adapters=(config.LoraAdapter("sql-lora", 1),),
            ),
        ),
        endpoints=tuple(
            config.EndpointConfig(
                address=a, model=MODEL, tenant="t", kv_events="tcp://127.0.0.1:1" if events else None
            )
            for a in (A, B, C)
        ),
    )
    store_ = policy.PolicyStore()
    store_.replace(policies or [])
    index = store.Index(policies=store_)
    toks = {MODEL: tokenizer.PromptTokenizer.load(tokenizer_dir)} if tokenizer_dir else {}
    up = ready if ready is not None else {A, B, C}
    p = picker.EndpointPicker(
        cfg,
        index,
        store_,
        settings=picker.PickerSettings(**settings),
        tokenizers=toks,
        is_ready=lambda rid: rid in up,
        clock=Clock(),
    )
    return p, index


def chat_body(content: str, **fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


def request(body: bytes | dict[str, Any], *, path: str = CHAT, **kw: Any) -> PickRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return PickRequest(
        method=kw.pop("method", "POST"), path=path, headers=kw.pop("headers", {}), body=raw, **kw
    )


def cache_on(
    index: store.Index, replica: str, ids: list[int], *, adapter: str = "", salt: str | None = None
) -> int:
    """Store the full blocks of ``ids`` on ``replica`` (as its KV events would); -> tokens."""
    keys = fingerprint.chain_keys(ids, BS, salt=salt)
    index.blocks_stored(
        types.Scope("t", MODEL, "vllm", adapter), replica, keys, [BS * (i + 1) for i in range(len(keys))]
    )
    return len(keys) * BS


def chat_ids(content: str) -> list[int]:
    tok = tokenizer.PromptTokenizer.load(TINY)
    return tok.encode_chat([{"role": "user", "content": content}])


LONG = "the quick brown fox jumps over the lazy dog " * 12


async def pick(p: picker.EndpointPicker, req: PickRequest) -> Decision:
    out = await p.pick(req)
    assert isinstance(out, Decision), out
    return out


async def reject(p: picker.EndpointPicker, req: PickRequest) -> Rejection:
    out = await p.pick(req)
    assert isinstance(out, Rejection), out
    return out


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        pytest.param(b"{not json", ErrorKind.BAD_REQUEST, None, id="bad-json"),
        pytest.param(b"", ErrorKind.BAD_REQUEST, None, id="empty-post"),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}]}, ErrorKind.BAD_REQUEST, "model", id="no-model"
        ),
        pytest.param(
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            ErrorKind.MODEL_NOT_FOUND,
            "model",
            id="unknown-model",
        ),
    ],
)
async def test_bad_requests_are_refused_with_the_error_table(
    body: bytes | dict[str, Any], kind: ErrorKind, param: str | None
) -> None:
    p, _ = make_picker()
    rejection = await reject(p, request(body))
    assert (rejection.kind, rejection.param) == (kind, param)
    assert json.loads(rejection.body())["error"]["message"]


async def test_the_replica_holding_the_prefix_is_chosen_and_the_hit_predicted() -> None:
    p, index = make_picker()
    ids = chat_ids(LONG)
    cached = cache_on(index, B, ids)
    d = await pick(p, request(chat_body(LONG)))
    assert d.endpoints == (B,)
    assert d.predicted_prompt_tokens == len(ids)
    # Capped as the engine caps a hit: the last prompt token is always recomputed.
    assert d.predicted_cached_tokens == min(cached, ((len(ids) - 1) // BS) * BS) > 0
    assert d.debug is None  # never on by default: it reveals cache state


async def test_debug_header_explains_the_ranking_when_enabled() -> None:
    p, index = make_picker(debug_header=True)
    cache_on(index, C, chat_ids(LONG))
    d = await pick(p, request(chat_body(LONG)))
    assert d.debug is not None
    explained = json.loads(d.debug)
    assert explained["match"] == "precise"
    assert explained["ranked"][0]["endpoint"] == C
    assert len(explained["ranked"]) == 3


@pytest.mark.parametrize(
    ("subset", "expected"),
    [
        pytest.param(None, {A, B, C}, id="none"),
        pytest.param((A, "10.9.9.9:1"), {A}, id="partial"),
        pytest.param((A, B, C), {A, B, C}, id="all"),
    ],
)
async def test_the_subset_hint_bounds_the_choice(subset: tuple[str, ...] | None, expected: set[str]) -> None:
    p, index = make_picker(fallback_endpoints=2)
    cache_on(index, B, chat_ids(LONG))
    d = await pick(p, request(chat_body(LONG), subset=subset))
    assert set(d.endpoints) == expected
    if B in expected:
        assert d.endpoints[0] == B


async def test_no_eligible_endpoint_is_503() -> None:
    p, _ = make_picker(ready={C})
    assert (await reject(p, request(chat_body("x"), subset=(A, B)))).status == 503
    p, _ = make_picker(ready=set())
    assert (await reject(p, request(chat_body("x")))).kind is ErrorKind.NO_ENDPOINT


async def test_unready_replicas_are_never_chosen_even_when_they_hold_the_prefix() -> None:
    p, index = make_picker(ready={A, C})
    cache_on(index, B, chat_ids(LONG))
    d = await pick(p, request(chat_body(LONG)))
    assert d.endpoints[0] in {A, C}


async def test_lora_names_match_in_the_adapter_scope() -> None:
    p, index = make_picker()
    ids = chat_ids(LONG)
    cache_on(index, A, ids, adapter="sql-lora")
    cache_on(index, C, ids)  # the base model's cache does not serve the adapter
    d = await pick(p, request({"model": "sql-lora", "messages": [{"role": "user", "content": LONG}]}))
    assert d.endpoints == (A,)
    assert d.predicted_cached_tokens


async def test_cache_salt_separates_caches() -> None:
    p, index = make_picker()
    ids = chat_ids(LONG)
    cache_on(index, A, ids)
    cache_on(index, C, ids, salt="tenant-secret")
    assert (await pick(p, request(chat_body(LONG, cache_salt="tenant-secret")))).endpoints == (C,)
    assert (await pick(p, request(chat_body(LONG)))).endpoints == (A,)


async def test_a_burst_of_one_cold_prefix_sticks_before_any_event_arrives() -> None:
    p, _ = make_picker()
    first = await pick(p, request(chat_body(LONG)))
    for _ in range(3):  # the first ones are still in flight: only speculation keeps them together
        assert (await pick(p, request(chat_body(LONG)))).endpoints == first.endpoints


async def test_a_cleared_replica_loses_its_speculative_entries() -> None:
    p, index = make_picker(debug_header=True)
    first = await pick(p, request(chat_body(LONG)))
    chosen = first.endpoints[0]
    p.finished(first, Outcome(response_complete=True))
    index.replica_cleared(chosen, model=MODEL, tenant="t")  # its engine restarted
    d = await pick(p, request(chat_body(LONG)))
    assert d.debug is not None
    assert all(r["matched_tokens"] == 0 for r in json.loads(d.debug)["ranked"])
    assert p.speculative.size == len(fingerprint.chain_keys(chat_ids(LONG), BS))  # only d's


async def test_cold_prefixes_spread() -> None:
    p, _ = make_picker()
    chosen = set()
    for i in range(12):
        d = await pick(p, request(chat_body(f"[{i}] " + LONG)))
        p.finished(d, Outcome(response_complete=True))  # no load left behind: only the tie-break
        chosen.add(d.endpoints[0])
    assert chosen == {A, B, C}


async def test_without_a_tokenizer_matching_is_approximate_and_learns_from_decisions() -> None:
    p, _ = make_picker(tokenizer_dir=None, debug_header=True)
    first = await pick(p, request(chat_body(LONG)))
    assert first.debug is not None and json.loads(first.debug)["match"] == "approximate"
    assert first.predicted_cached_tokens is None  # no exact prediction without tokens
    p.finished(first, Outcome(response_complete=True))
    again = await pick(p, request(chat_body(LONG + " and one more question")))
    assert again.endpoints == first.endpoints


async def test_without_kv_events_matching_is_approximate_even_with_a_tokenizer() -> None:
    p, index = make_picker(events=False, debug_header=True)
    cache_on(index, B, chat_ids(LONG))  # nothing can have stored these: no events
    first = await pick(p, request(chat_body(LONG)))
    assert first.debug is not None and json.loads(first.debug)["match"] == "approximate"
    p.finished(first, Outcome(response_complete=True))
    assert (await pick(p, request(chat_body(LONG + " more")))).endpoints == first.endpoints


async def test_matching_over_its_deadline_routes_on_load_only(monkeypatch: pytest.MonkeyPatch) -> None:
    p, index = make_picker(
        debug_header=True,
        tenant_header=True,
        policies=[policy.NamespacePolicy("slow", lookup_timeout_ms=20)],
    )
    long = LONG * 6  # more than INLINE_TOKENIZE_CHARS left to tokenize: a worker thread
    assert len(long) > picker.INLINE_TOKENIZE_CHARS
    cache_on(index, B, chat_ids(long))
    encoder = p.routes[MODEL].tokenizer
    assert encoder is not None
    real = encoder.finish_entry
    done = threading.Event()

    def slow(text: str, probe: Any) -> Any:
        time.sleep(0.3)
        done.set()
        return real(text, probe)

    monkeypatch.setattr(encoder, "finish_entry", slow)
    d = await pick(p, request(chat_body(long), headers={picker.TENANT_HEADER: "slow"}))
    assert d.debug is not None and json.loads(d.debug)["match"] == "timeout"
    assert d.predicted_cached_tokens is None
    # The same request under the model's own tenant (1 s default deadline) waits and matches.
    assert (await pick(p, request(chat_body(long)))).endpoints == (B,)
    assert done.wait(5)


async def test_a_short_follow_up_is_tokenized_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    p, index = make_picker()
    cache_on(index, B, chat_ids(LONG))
    first = [{"role": "user", "content": LONG}]
    await pick(p, request({"model": MODEL, "messages": first}))
    calls: list[str] = []
    monkeypatch.setattr(asyncio, "to_thread", lambda *a, **k: calls.append("thread"))
    follow = [*first, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    d = await pick(p, request({"model": MODEL, "messages": follow}))
    assert calls == []  # the prefix cache left a few characters: no worker-thread hop
    assert d.endpoints == (B,)


@pytest.mark.parametrize("salt", [None, "tenant-secret"])
def test_follow_up_block_keys_equal_the_full_chain_and_hash_only_new_blocks(
    monkeypatch: pytest.MonkeyPatch, salt: str | None
) -> None:
    encoder = tokenizer.CachedChatEncoder(tokenizer.PromptTokenizer.load(TINY))
    hashed: list[int] = []
    real = fingerprint.prefix_hashes

    def counting(tokens: Any, block_size: int, **kw: Any) -> list[int]:
        out = real(tokens, block_size, **kw)
        hashed.append(len(out))
        return out

    monkeypatch.setattr(fingerprint, "prefix_hashes", counting)
    chat: list[dict[str, str]] = [{"role": "system", "content": LONG}]
    for turn in range(5):
        chat.append({"role": "user", "content": f"question {turn} " + "words " * (turn * 7)})
        text = encoder.tokenizer.render_chat(chat)
        probe = encoder.lookup(text)
        encoded = encoder.finish_entry(text, probe)
        hashed.clear()
        keys = picker.block_keys(probe, encoded, BS, salt)
        assert keys == real_chain(encoded.ids, salt)  # byte-identical to a full chain
        known = len(probe.prefix) // BS if turn else 0
        assert turn == 0 or probe.block_keys  # the previous turn left its keys
        assert hashed == [len(keys) - known]  # only the blocks past the cached prefix
        chat.append({"role": "assistant", "content": f"answer {turn}"})
    other = "other" if salt else None  # another salt over the same prefix: its own chain
    text = encoder.tokenizer.render_chat(chat)
    probe = encoder.lookup(text)
    encoded = encoder.finish_entry(text, probe)
    assert picker.block_keys(probe, encoded, BS, other) == real_chain(encoded.ids, other)


def real_chain(ids: list[int], salt: str | None) -> list[bytes]:
    keys: list[bytes] = []
    parent = fingerprint.salt_root(salt) if salt else None
    for b in range(len(ids) // BS):
        c = fingerprint.content_hash(ids[b * BS : (b + 1) * BS])
        parent = c if parent is None else fingerprint.chain_hash(parent, c)
        keys.append(fingerprint.key_bytes(parent))
    return keys


async def test_speculative_entries_start_past_the_index_match() -> None:
    """A decision records only the blocks the index does not hold on the chosen replica;
    the next request still sees the whole run (index + speculative) there."""
    longer = LONG + "and then a much longer question about the fox " * 4
    long_keys = fingerprint.chain_keys(chat_ids(longer), BS)
    p, index = make_picker(debug_header=True)
    held = cache_on(index, B, chat_ids(LONG)) // BS
    assert 0 < held < len(long_keys)
    first = await pick(p, request(chat_body(longer)))
    assert first.endpoints == (B,)
    assert p.speculative.size == len(long_keys) - held
    second = await pick(p, request(chat_body(longer)))
    # the same as a picker whose speculative entries hold the whole prompt
    cold, _ = make_picker(debug_header=True)
    await pick(cold, request(chat_body(longer)))
    assert cold.speculative.size == len(long_keys)
    reference = await pick(cold, request(chat_body(longer)))
    assert second.endpoints == (B,) and second.predicted_cached_tokens == reference.predicted_cached_tokens
    assert second.predicted_cached_tokens is not None and second.predicted_cached_tokens > held * BS


async def test_the_tenant_header_is_ignored_unless_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    p, index = make_picker(debug_header=True, policies=[policy.NamespacePolicy("slow", lookup_timeout_ms=1)])
    cache_on(index, B, chat_ids(LONG))
    d = await pick(p, request(chat_body(LONG), headers={picker.TENANT_HEADER: "slow"}))
    assert d.endpoints == (B,)


async def test_shedding_only_when_every_replica_is_predicted_too_slow() -> None:
    p, _ = make_picker(limits=openai.Limits(shed_ttft_ms=1e6))
    assert isinstance(await p.pick(request(chat_body(LONG))), Decision)
    p, _ = make_picker(limits=openai.Limits(shed_ttft_ms=0.001))
    assert (await reject(p, request(chat_body(LONG)))).status == 429


async def test_round_robin_ignores_the_cache_but_does_the_same_work() -> None:
    p, index = make_picker(routing="round-robin", debug_header=True)
    cache_on(index, B, chat_ids(LONG))
    chosen = [(await pick(p, request(chat_body(LONG)))).endpoints[0] for _ in range(6)]
    assert chosen == [A, B, C, A, B, C]


async def test_in_flight_load_moves_cold_traffic_and_is_released_when_finished() -> None:
    p, _ = make_picker(scoring=ScoringSettings(inflight_request_ms=50.0))
    d = await pick(p, request(chat_body("[x] " + LONG)))
    assert p.inflight.load(d.endpoints[0]).requests == 1
    p.finished(d, Outcome(response_complete=True, status=200))
    assert p.inflight.load(d.endpoints[0]).requests == 0
    p.finished(d, Outcome(response_complete=True))  # idempotent
    assert p.inflight.load(d.endpoints[0]).requests == 0


async def test_bodiless_and_other_paths_go_to_the_least_loaded_ready_endpoint() -> None:
    p, _ = make_picker(ready={A, B})
    busy = await pick(p, request(chat_body("[busy] " + LONG)))
    d = await pick(p, request(b"", method="GET", path="/v1/models"))
    assert d.endpoints[0] in {A, B} - set(busy.endpoints)


def test_a_failed_scrape_forgets_the_engine_gauges() -> None:
    from inference_cache import enginestats

    p, _ = make_picker()
    stats = enginestats.EngineStats(types.ReplicaStats(), 1.0, 5.0, 0.5)
    p.observe_engine(A, stats)
    gauges = p.inflight.engine(A)
    assert gauges is not None and gauges.waiting == 5.0
    p.observe_engine(A, None)
    after = p.inflight.engine(A)
    assert after is None or (after.running, after.waiting) == (None, None)


# -- templated requests (issue #8) ----------------------------------------------------------

MANUAL = "Answer from the manual: the quick brown fox jumps over the lazy dog. " * 6
CHAT_TEMPLATE = template_samples.CHAT_TEMPLATE
TEXT_TEMPLATE = {
    "body": "{{.manual}}\n\nQuestion: {{.question}}",
    "slots": [{"name": "manual", "type": "Stable"}, {"name": "question", "type": "Mutable"}],
    "allowedNamespaces": ["u"],
}


def templated_picker(**settings: Any) -> tuple[picker.EndpointPicker, store.Index]:
    p, index = make_picker(**settings)
    p.templates = templates.TemplateStore(
        [
            templates.build("t", "support", CHAT_TEMPLATE),
            templates.build("t", "plain", TEXT_TEMPLATE),
            templates.build("u", "private", TEXT_TEMPLATE),
        ]
    )
    return p, index


def templated(question: str, *, name: str | None = "t/support", **fields: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"variables": {"persona": " a  librarian", "manual": MANUAL, "question": question}}
    if name is not None:
        ref["name"] = name
    return {"model": MODEL, "template": ref, **fields}


def rendered_messages(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"You are a librarian.\n\n{MANUAL.strip()}"},
        {"role": "user", "content": question},
    ]


async def test_a_templated_chat_request_is_rendered_rewritten_and_routed_on_the_rendering() -> None:
    p, index = templated_picker()
    messages = rendered_messages("Where is the fox?")
    ids = tokenizer.PromptTokenizer.load(TINY).encode_chat(messages)
    cache_on(index, B, ids)
    d = await pick(p, request(templated("Where is the fox?", max_tokens=7, stream=False)))
    assert d.endpoints == (B,)
    assert d.predicted_prompt_tokens == len(ids)
    assert d.body is not None
    assert json.loads(d.body) == {"model": MODEL, "max_tokens": 7, "stream": False, "messages": messages}


async def test_the_stable_prefix_of_a_template_hits_on_the_next_request() -> None:
    p, index = templated_picker()
    tok = tokenizer.PromptTokenizer.load(TINY)
    spec = render.TemplateSpec.from_dict(CHAT_TEMPLATE)
    stable = render.stable_prefix(spec, tok, BS, variables={"persona": "a librarian", "manual": MANUAL})
    assert len(stable.block_keys) >= 3
    first = await pick(p, request(templated("Where is the fox?")))
    # The engine caches the first prompt and says so (KV events).
    cache_on(index, first.endpoints[0], tok.encode_chat(rendered_messages("Where is the fox?")))
    p.finished(first, Outcome(response_complete=True))
    second = await pick(p, request(templated("And the dog, then?")))
    assert second.endpoints == first.endpoints
    assert second.predicted_cached_tokens is not None
    assert second.predicted_cached_tokens >= len(stable.block_keys) * BS


async def test_a_text_template_named_by_the_header_on_completions() -> None:
    p, _ = templated_picker()
    body = {"model": MODEL, "template": {"variables": {"manual": "m", "question": "q"}}}
    headers = {picker.TEMPLATE_HEADER: "t/plain"}
    d = await pick(p, request(body, path="/v1/completions", headers=headers))
    assert d.body is not None and json.loads(d.body) == {"model": MODEL, "prompt": "m\n\nQuestion: q"}
    # The header alone (no template field): every slot is optional here.
    d = await pick(p, request({"model": MODEL}, path="/v1/completions", headers=headers))
    assert d.body is not None and json.loads(d.body)["prompt"] == "\n\nQuestion: "
    # A request without a template is forwarded unchanged.
    assert (await pick(p, request(chat_body("x")))).body is None


async def test_the_tenant_header_picks_the_namespace_when_trusted() -> None:
    body = {"model": MODEL, "template": {"name": "u/private"}}
    headers = {picker.TENANT_HEADER: "u"}
    p, _ = templated_picker()
    assert (await reject(p, request(body, path="/v1/completions", headers=headers))).status == 404
    p, _ = templated_picker(tenant_header=True)
    assert (await pick(p, request(body, path="/v1/completions", headers=headers))).body is not None
    # u may use t/plain (allowedNamespaces) but not t/support.
    plain = {"model": MODEL, "template": {"name": "t/plain"}}
    assert (await pick(p, request(plain, path="/v1/completions", headers=headers))).body is not None
    assert (await reject(p, request(templated("q"), headers=headers))).kind is ErrorKind.TEMPLATE_NOT_FOUND


@pytest.mark.parametrize(
    ("body", "path", "headers", "kind", "param"),
    [
        pytest.param(
            templated("q", name="t/nope"),
            CHAT,
            {},
            ErrorKind.TEMPLATE_NOT_FOUND,
            "template.name",
            id="unknown",
        ),
        pytest.param(
            templated("q", name="u/private"),
            CHAT,
            {},
            ErrorKind.TEMPLATE_NOT_FOUND,
            "template.name",
            id="other-ns",
        ),
        pytest.param(
            templated("q"),
            "/v1/completions",
            {},
            ErrorKind.BAD_REQUEST,
            "template.name",
            id="chat-on-completions",
        ),
        pytest.param(
            {"model": MODEL, "template": {"name": "t/plain"}},
            CHAT,
            {},
            ErrorKind.BAD_REQUEST,
            "template.name",
            id="text-on-chat",
        ),
        pytest.param(
            {"model": MODEL, "template": {"name": "t/support", "variables": {"persona": "p", "manual": "m"}}},
            CHAT,
            {},
            ErrorKind.BAD_REQUEST,
            "template.variables.question",
            id="missing-required",
        ),
        pytest.param(
            templated("q", messages=[{"role": "user", "content": "x"}]),
            CHAT,
            {},
            ErrorKind.BAD_REQUEST,
            "template",
            id="both",
        ),
        pytest.param(
            templated("q"),
            CHAT,
            {picker.TEMPLATE_HEADER: "t/plain"},
            ErrorKind.BAD_REQUEST,
            "template.name",
            id="header-differs",
        ),
        pytest.param(
            {"model": "nope", "template": {"name": "t/support"}},
            CHAT,
            {},
            ErrorKind.MODEL_NOT_FOUND,
            "model",
            id="model",
        ),
    ],
)
async def test_templated_request_errors(
    body: dict[str, Any], path: str, headers: dict[str, str], kind: ErrorKind, param: str
) -> None:
    p, _ = templated_picker()
    rejection = await reject(p, request(body, path=path, headers=headers))
    assert (rejection.kind, rejection.param) == (kind, param)
    error = json.loads(rejection.body())["error"]
    assert error["param"] == param and error["message"]


async def test_without_a_template_store_every_template_is_unknown() -> None:
    p, _ = make_picker()
    rejection = await reject(p, request(templated("q")))
    assert (rejection.status, json.loads(rejection.body())["error"]["code"]) == (404, "template_not_found")


# -- matching: bytes (issue #9) --------------------------------------------------------------


def bytes_picker(
    *, events: bool = True, max_entries: int = 0, matching: str = "bytes", **settings: Any
) -> tuple[picker.EndpointPicker, store.Index, bytekeys.ByteIndex | None]:
    """A picker whose model is matched by bytes, its ``ByteIndex`` built as ``serve`` builds it
    and kept in step with the index's evictions."""
    cfg = config.Config(
        models=(config.ModelConfig(MODEL, block_size=BS, tokenizer=str(TINY), matching=matching),),
        endpoints=tuple(
            config.EndpointConfig(
                address=a, model=MODEL, tenant="t", kv_events="tcp://127.0.0.1:1" if events else None
            )
            for a in (A, B, C)
        ),
    )
    config.validate(cfg)
    toks = {MODEL: tokenizer.PromptTokenizer.load(TINY)}
    byte_indexes = serve.build_byte_indexes(cfg, toks)
    index = store.Index(store.IndexSettings(max_entries=max_entries))
    bidx = byte_indexes.get(MODEL)
    if bidx is not None:
        index.add_eviction_listener(lambda scope, rid, keys: bidx.blocks_removed(scope, rid, keys))
    p = picker.EndpointPicker(
        cfg,
        index,
        policy.PolicyStore(),
        settings=picker.PickerSettings(debug_header=True, **settings),
        tokenizers=toks,
        clock=Clock(),
        byte_indexes=byte_indexes,
    )
    return p, index, bidx


def cache_both(index: store.Index, bidx: bytekeys.ByteIndex, replica: str, ids: list[int]) -> int:
    """What a replica's KV events feed: the index and the model's byte chain, same keys."""
    keys = fingerprint.chain_keys(ids, BS)
    scope = types.Scope("t", MODEL, "vllm", "")
    bidx.blocks_stored(scope, replica, None, keys, ids[: len(keys) * BS])  # first, as the mapper does
    index.blocks_stored(scope, replica, keys, [BS * (i + 1) for i in range(len(keys))])
    return len(keys) * BS


def match_of(d: Decision) -> str:
    assert d.debug is not None
    return str(json.loads(d.debug)["match"])


async def test_bytes_matching_finds_the_cached_prefix_without_tokenizing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p, index, bidx = bytes_picker()
    assert bidx is not None and p.routes[MODEL].bytes is not None
    first = chat_ids(LONG)
    cache_both(index, bidx, B, first)
    follow = LONG + "and then some more words about the fox"
    twin, twin_index = make_picker()  # the token path, same cache
    cache_on(twin_index, B, first)
    want = await pick(twin, request(chat_body(follow)))

    def no_tokenizing(*_a: Any, **_k: Any) -> list[int]:
        raise AssertionError("the byte path must not tokenize")

    monkeypatch.setattr(tokenizer.CachedChatEncoder, "finish", no_tokenizing)
    monkeypatch.setattr(tokenizer.CachedChatEncoder, "encode_text", no_tokenizing)
    d = await pick(p, request(chat_body(follow)))
    assert d.endpoints == (B,)
    assert match_of(d) == picker.MATCH_BYTES
    # exactly the token path's prediction
    assert d.predicted_cached_tokens == want.predicted_cached_tokens > 0
    assert d.predicted_prompt_tokens is None  # estimated from bytes: not a prediction


async def test_bytes_matching_leaves_other_requests_on_the_token_path() -> None:
    p, index, bidx = bytes_picker()
    assert bidx is not None
    cache_both(index, bidx, B, chat_ids(LONG))
    d = await pick(p, request(chat_body(LONG, add_special_tokens=True)))
    assert match_of(d) == picker.MATCH_PRECISE
    d = await pick(p, request({"model": MODEL, "prompt": LONG}, path="/v1/completions"))
    assert match_of(d) == picker.MATCH_PRECISE


async def test_bytes_matching_needs_kv_events_from_every_endpoint() -> None:
    p, _index, bidx = bytes_picker(events=False)
    assert bidx is not None and p.routes[MODEL].bytes is None
    assert (p.routes[MODEL].matching, p.routes[MODEL].matching_reason) == (
        "approximate",
        "an endpoint has no kv_events",
    )
    d = await pick(p, request(chat_body(LONG)))
    assert match_of(d) == picker.MATCH_APPROX


@pytest.mark.parametrize(
    ("matching", "mode", "match"),
    [
        ("auto", "bytes", picker.MATCH_BYTES),
        ("bytes", "bytes", picker.MATCH_BYTES),
        ("tokens", "tokens", picker.MATCH_PRECISE),
        ("approximate", "approximate", picker.MATCH_APPROX),
    ],
)
async def test_each_matching_mode_routes_chat_requests_its_way(matching: str, mode: str, match: str) -> None:
    p, _index, _bidx = bytes_picker(matching=matching)
    assert (p.routes[MODEL].matching, p.routes[MODEL].matching_reason) == (mode, "")
    assert p.routes[MODEL].precise == (mode != "approximate")
    d = await pick(p, request(chat_body(LONG)))
    assert match_of(d) == match


def test_auto_is_the_default_matching() -> None:
    assert config.ModelConfig(MODEL).matching == "auto"


@pytest.mark.parametrize("matching", ["auto", "bytes"])
async def test_a_tokenizer_that_is_not_byte_recoverable_keeps_tokens(
    matching: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = bytekeys.ByteTable.of

    def broken(tok: Any) -> bytekeys.ByteTable:
        return dataclasses.replace(real(tok), recoverable=False, reason="self-check failed")

    monkeypatch.setattr(bytekeys.ByteTable, "of", broken)
    with caplog.at_level(logging.DEBUG, logger="inference_cache.extproc.picker"):
        p, _index, _bidx = bytes_picker(matching=matching)
    route = p.routes[MODEL]
    assert route.bytes is None and route.matching == "tokens"
    assert route.matching_reason == "the tokenizer is not byte-recoverable"
    (rec,) = [r for r in caplog.records if r.getMessage() == "matching_mode"]
    # only an explicit `bytes` warns; auto says why at debug (serve logs the mode at startup)
    assert rec.levelno == (logging.WARNING if matching == "bytes" else logging.DEBUG)
    assert rec.__dict__["reason"] == "the tokenizer is not byte-recoverable: self-check failed"
    d = await pick(p, request(chat_body(LONG)))
    assert match_of(d) == picker.MATCH_PRECISE


async def test_endpoint_changes_apply_the_matching_rule_again() -> None:
    p, _index, bidx = bytes_picker(matching="auto")
    assert bidx is not None
    with_events = [
        config.EndpointConfig(address=a, model=MODEL, tenant="t", kv_events="tcp://x:1") for a in (A, B)
    ]
    without = [*with_events, config.EndpointConfig(address=C, model=MODEL, tenant="t")]
    p.set_endpoints(MODEL, without)
    assert (p.routes[MODEL].matching, p.routes[MODEL].bytes) == ("approximate", None)
    assert match_of(await pick(p, request(chat_body(LONG)))) == picker.MATCH_APPROX
    p.set_endpoints(MODEL, with_events)
    assert p.routes[MODEL].matching == "bytes" and p.routes[MODEL].bytes is not None
    assert match_of(await pick(p, request(chat_body(LONG)))) == picker.MATCH_BYTES


async def test_a_burst_of_one_new_prefix_sticks_to_one_replica_by_bytes() -> None:
    """As ``test_a_burst_of_one_cold_prefix_sticks_before_any_event_arrives``, by bytes (how
    long it sticks is the scorer's trade-off against the load)."""
    for text in (LONG, LONG + "and twice: " + LONG):
        p, index, _bidx = bytes_picker()
        first = await pick(p, request(chat_body(text)))
        assert match_of(first) == picker.MATCH_BYTES
        # the first one is still in flight: only speculation keeps them together
        d = await pick(p, request(chat_body(text)))
        assert d.endpoints == first.endpoints, (first.debug, d.debug)
        assert d.debug is not None
        claims = {r["endpoint"]: r["matched_tokens"] for r in json.loads(d.debug)["ranked"]}
        assert claims.pop(first.endpoints[0]) > 0 and set(claims.values()) == {0}
        assert index.total_entries == 0


async def test_speculative_byte_keys_continue_the_indexed_match() -> None:
    p, index, bidx = bytes_picker()
    assert bidx is not None
    cache_both(index, bidx, A, chat_ids(LONG))  # A holds the shared prefix
    follow = LONG + " and a long new question about the fox and the lazy dog: " + LONG * 2
    first = await pick(p, request(chat_body(follow)))
    assert first.endpoints == (A,)
    second = await pick(p, request(chat_body(follow)))
    assert second.endpoints == (A,)
    assert second.predicted_cached_tokens is not None and first.predicted_cached_tokens is not None
    assert second.predicted_cached_tokens > first.predicted_cached_tokens


async def test_byte_fallbacks_and_boundaries_are_counted() -> None:
    p, index, bidx = bytes_picker()
    assert bidx is not None
    cache_both(index, bidx, B, chat_ids(LONG))
    await pick(p, request(chat_body(LONG + " more")))
    await pick(p, request(chat_body("nothing cached")))
    await pick(p, request(chat_body(LONG, add_special_tokens=True)))
    await pick(p, request({"model": MODEL, "prompt": LONG}, path="/v1/completions"))
    assert sum(p.byte_boundaries.values()) == 2
    assert p.byte_boundaries[MODEL, "none"] == 1
    assert p.byte_fallbacks == {
        (MODEL, picker.FALLBACK_SPECIAL_TOKENS): 1,
        (MODEL, picker.FALLBACK_NOT_CHAT): 1,
    }


async def test_index_evictions_drop_the_byte_chain_entries() -> None:
    _p, index, bidx = bytes_picker(max_entries=4)
    assert bidx is not None
    ids = chat_ids(LONG)
    blocks = cache_both(index, bidx, B, ids) // BS
    assert blocks > 4
    assert index.total_entries == 4 and bidx.entries == 4  # the cap evicted the rest from both
    with bidx.reading(types.Scope("t", MODEL, "vllm", "")) as chain:
        assert len(chain.blocks) == 4 and set(chain.blocks) <= set(fingerprint.chain_keys(ids, BS))


def test_matching_must_be_a_known_mode() -> None:
    cfg = config.Config(models=(config.ModelConfig(MODEL, matching="fuzzy"),))
    with pytest.raises(config.ConfigError, match=r"models\[0\]\.matching"):
        config.validate(cfg)
