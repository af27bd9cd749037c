"""``inference-cache bench extproc``: a tiny real run (Envoy, the server process, echo
engines) checks the JSON shape; no timing is asserted. Plus the pure helpers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
import zmq
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference_cache import cli, envoy
from inference_cache import tokenizer as tokenizer_mod
from inference_cache.extproc import bench, bench_peers
from inference_cache.fakeengine import hashing
from inference_cache.index.kvevents import decode

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"

CELL_KEYS = {
    "size_tokens",
    "turn",
    "matching",
    "matching_mode",
    "prompt_tokens",
    "requests",
    "concurrency",
    "envoy_p50_ms",
    "envoy_p99_ms",
    "envoy_rps",
    "extproc_p50_ms",
    "extproc_p99_ms",
    "extproc_rps",
    "added_p50_ms",
    "added_p99_ms",
    "decision_p50_ms",
    "decision_p99_ms",
    "decision_mean_ms",
    "server_cpu_ms_per_request",
    "server_capacity_rps",
    "index_matched_tokens",
    "byte_matched_requests",
    "vllm_router_workers",
    "vllm_kv_aware_p50_ms",
    "vllm_kv_aware_p99_ms",
    "vllm_kv_aware_rps",
    "vllm_kv_aware_added_p50_ms",
    "vllm_kv_aware_added_p99_ms",
    "vllm_kv_aware_lookup_hits",
    "errors",
}
NO_ROUTER = ["--vllm-router", "/nonexistent/vllm-router"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("envoy_config", [None, "envoy-streamed.yaml", "envoy-override-host.yaml"])
def test_a_tiny_run_writes_one_object_per_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], envoy_config: str | None
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "extproc", "--sizes", "64,128", "--requests", "4", "--warmup", "1"]
    argv += ["--concurrency", "2", "--engines", "2", "--no-taskset"]
    argv += ["--tokenizer", str(TINY_TOKENIZER), "--json", str(out), "--matching", "tokens", *NO_ROUTER]
    if envoy_config is not None:  # errors == 0 below: every request was routed through it
        argv += ["--envoy-config", str(bench.ENVOY_CONFIG.parent / envoy_config)]

    assert cli.main(argv) == 0

    cells = json.loads(out.read_text())
    assert [(c["size_tokens"], c["turn"]) for c in cells] == [
        (64, "first"),
        (64, "follow-up"),
        (128, "first"),
        (128, "follow-up"),
    ]
    for cell in cells:
        assert set(cell) == CELL_KEYS
        assert cell["errors"] == 0
        assert cell["requests"] == 4
        assert cell["prompt_tokens"] > 0
    # Follow-ups hit the KV index on the engine that served the first turn (full blocks),
    # fed by the KV events the bench published for it.
    assert all(c["index_matched_tokens"] >= bench.BLOCK_SIZE for c in cells if c["turn"] == "follow-up")
    assert all(c["index_matched_tokens"] is None for c in cells if c["turn"] == "first")
    assert all(c["matching_mode"] == "tokens" and c["byte_matched_requests"] is None for c in cells)
    assert all(c["vllm_router_workers"] is None and c["vllm_kv_aware_p50_ms"] is None for c in cells)
    printed = capsys.readouterr()
    assert "| size | turn |" in printed.out
    assert "vllm-router not found at /nonexistent/vllm-router" in printed.err


def test_envoy_alone_differs_from_the_shipped_config_only_in_filter_and_cluster() -> None:
    shipped = envoy.load_config(bench.ENVOY_CONFIG)
    alone = bench.without_extproc(shipped)

    hcm = alone["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.router"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["route"]["cluster"] for r in routes] == [envoy.ENGINE_CLUSTER]
    shipped_hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert len(shipped_hcm["typed_config"]["http_filters"]) == 3  # the shipped file is untouched
    wired = envoy.loopback(alone, extproc="127.0.0.1:1", engines=["127.0.0.1:2", "127.0.0.1:3"])
    clusters = {c["name"]: c for c in wired["static_resources"]["clusters"]}
    members = clusters[envoy.ENGINE_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [m["endpoint"]["address"]["socket_address"]["port_value"] for m in members] == [2, 3]


def test_envoy_alone_replaces_a_configs_own_engine_cluster() -> None:
    shipped = envoy.load_config(bench.ENVOY_CONFIG.parent / "envoy-override-host.yaml")
    alone = bench.without_extproc(shipped)
    engines = [c for c in alone["static_resources"]["clusters"] if c["name"] == envoy.ENGINE_CLUSTER]
    assert [(c["type"], c["lb_policy"]) for c in engines] == [("STATIC", "ROUND_ROBIN")]
    assert "load_balancing_policy" in str(shipped)  # the input is untouched


def test_histogram_quantile_interpolates_the_delta_between_scrapes() -> None:
    before = {"0.001": 10.0, "0.005": 10.0, "+Inf": 10.0, "count": 10.0, "sum": 0.005}
    after = {"0.001": 10.0, "0.005": 20.0, "+Inf": 30.0, "count": 30.0, "sum": 1.0}

    assert bench.histogram_quantile(before, after, 0.25) == pytest.approx(3.0)  # 5 of 10 in (1, 5] ms
    assert bench.histogram_quantile(before, after, 0.99) == pytest.approx(5.0)  # +Inf bucket: its lower bound
    assert bench.histogram_quantile(after, after, 0.5) != bench.histogram_quantile(after, after, 0.5)  # nan


def test_sizes_take_k_suffixes() -> None:
    parser = cli.build_parser(["bench", "extproc"])
    args = parser.parse_args(["bench", "extproc", "--sizes", "1k,8k,100"])
    assert args.sizes == (1024, 8192, 100)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("matching", ["bytes", "auto"])
def test_the_byte_path_measures_follow_ups_through_kv_events(tmp_path: Path, matching: str) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "extproc", "--sizes", "64", "--requests", "3", "--warmup", "1", "--matching", matching]
    argv += ["--concurrency", "1", "--engines", "2", "--no-taskset", "--tokenizer", str(TINY_TOKENIZER)]
    argv += ["--json", str(out), *NO_ROUTER]

    assert cli.main(argv) == 0

    cells = json.loads(out.read_text())
    assert [(c["turn"], c["matching"], c["matching_mode"]) for c in cells] == [
        ("first", matching, "bytes"),
        ("follow-up", matching, "bytes"),
    ]
    assert all(c["errors"] == 0 for c in cells)
    first, follow = cells
    assert first["byte_matched_requests"] == 0  # nothing cached yet
    assert follow["byte_matched_requests"] == 3  # every timed follow-up matched its first turn's blocks
    assert follow["index_matched_tokens"] >= bench.BLOCK_SIZE


@pytest.mark.timeout(180)
def test_vllm_router_kv_aware_is_measured_beside_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert os.access(bench_peers.VLLM_ROUTER, os.X_OK), "`make vllm-router` installs it (make test does)"
    out = tmp_path / "bench.json"
    argv = ["bench", "extproc", "--sizes", "64", "--requests", "3", "--warmup", "1", "--engines", "1"]
    argv += ["--no-taskset", "--tokenizer", str(TINY_TOKENIZER), "--json", str(out)]

    assert cli.main(argv) == 0

    first, follow = json.loads(out.read_text())
    assert first["vllm_router_workers"] == follow["vllm_router_workers"] == 1
    assert first["vllm_kv_aware_lookup_hits"] == 0
    assert follow["vllm_kv_aware_lookup_hits"] == 3  # its render tokens hash to the published blocks
    assert follow["vllm_kv_aware_p50_ms"] > 0 and first["errors"] == follow["errors"] == 0
    assert "below vllm-router kv_aware's at every prompt size (64)" in capsys.readouterr().out


def test_the_server_config_subscribes_to_each_engines_events() -> None:
    cfg = bench.server_config(TINY_TOKENIZER, {"127.0.0.1:1": "tcp://127.0.0.1:5"}, "bytes")
    assert cfg["models"][0]["matching"] == "bytes"
    assert cfg["endpoints"] == [
        {
            "address": "127.0.0.1:1",
            "model": bench.MODEL,
            "tenant": bench.TENANT,
            "kv_events": "tcp://127.0.0.1:5",
        }
    ]


# -- what an engine answers vllm-router ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tokenizer_mod.PromptTokenizer:
    return tokenizer_mod.PromptTokenizer.load(TINY_TOKENIZER)


async def test_render_and_tokenize_answer_like_vllm(tiny: tokenizer_mod.PromptTokenizer) -> None:
    conv = bench.conversations(tiny, 64, 1, seed=3)[0]
    app = web.Application()
    bench_peers.add_vllm_routes(app, tiny, bench.MODEL)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        async with session.post(server.make_url(bench_peers.RENDER_PATH), data=conv.follow_up) as resp:
            assert resp.status == 200
            rendered = await resp.json()
        chat = json.loads(conv.follow_up)
        async with session.post(server.make_url(bench_peers.TOKENIZE_PATH), json=chat) as resp:
            tokenized = await resp.json()
        async with session.post(server.make_url(bench_peers.TOKENIZE_PATH), json={"prompt": "fox"}) as resp:
            plain = await resp.json()
        async with session.post(server.make_url(bench_peers.RENDER_PATH), json={"messages": "no"}) as resp:
            assert resp.status == 400
            assert "messages" in (await resp.json())["error"]["message"]

    # The ids the picker computes for the chat, so vllm-router's block hashes meet the events'.
    assert rendered["token_ids"] == list(conv.follow_tokens)
    assert set(rendered) == {
        "request_id",
        "token_ids",
        "features",
        "sampling_params",
        "model",
        "stream",
        "cache_salt",
    }
    assert rendered["model"] == bench.MODEL and rendered["sampling_params"] == {"max_tokens": 1}
    assert tokenized["tokens"] == list(conv.follow_tokens) and tokenized["count"] == len(conv.follow_tokens)
    assert tokenized["max_model_len"] == bench_peers.MAX_MODEL_LEN and tokenized["token_strs"] is None
    assert plain["tokens"] == tiny.encode("fox", add_special_tokens=True)


# -- KV events ----------------------------------------------------------------------------------


def test_published_kv_events_decode_as_vllm_batches(tiny: tokenizer_mod.PromptTokenizer) -> None:
    tokens = list(range(100, 100 + 3 * bench.BLOCK_SIZE + 5))  # 3 full blocks and a partial one
    address = "127.0.0.1:1"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        with bench_peers.KvEvents([address], bench.BLOCK_SIZE) as kv:
            assert kv.endpoint(address).startswith("tcp://127.0.0.1:")
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(kv.endpoint(address))
            deadline = time.monotonic() + 10
            # PUB drops what it sends before the subscription arrives: publish until one lands.
            while not sub.poll(50):
                assert time.monotonic() < deadline, "no KV event batch arrived"
                kv.publishers[address].stored(tokens)
            topic, seq, payload = sub.recv_multipart()
    finally:
        sub.close(linger=0)
        ctx.term()

    message = decode.split_live([topic, seq, payload])
    assert topic == bench_peers.TOPIC and message.seq >= 0
    batch = decode.decode_batch(payload)
    (stored,) = batch.events
    assert isinstance(stored, decode.BlockStored)
    assert stored.token_ids == tuple(tokens[: 3 * bench.BLOCK_SIZE])
    assert stored.block_size == bench.BLOCK_SIZE and stored.parent_block_hash is None
    hasher = hashing.BlockHasher.create(
        bench_peers.HASH_ALGO, None, bench.BLOCK_SIZE, bench_peers.VLLM_VERSION
    )
    expected = [hashing.external(h) for h in hasher.extend([], tokens)]
    assert list(stored.block_hashes) == expected  # vLLM's sha256_cbor chain, low 64 bits


# -- vllm-router ---------------------------------------------------------------------------------


def test_the_vllm_router_command_line() -> None:
    def command(*, pin: bool) -> tuple[list[str], dict[str, str]]:
        return bench_peers.vllm_router_command(
            Path("/x/vllm-router"),
            port=7001,
            metrics_port=7002,
            worker="127.0.0.1:8001",
            events_endpoint="tcp://127.0.0.1:5001",
            model="m",
            block_size=16,
            tokenizer=Path("/tok"),
            pin=pin,
        )

    cmd, env = command(pin=True)
    assert cmd[:4] == ["taskset", "-c", "0", "/x/vllm-router"]
    line = " ".join(cmd)
    assert "--host 127.0.0.1 --port 7001 --worker-urls http://127.0.0.1:8001 --policy kv_aware" in line
    assert "--kv-event-source http://127.0.0.1:8001=tcp://127.0.0.1:5001" in line
    assert "--kv-event-model m --kv-event-block-size 16" in line
    assert "--prometheus-host 127.0.0.1 --prometheus-port 7002" in line
    assert env == {"VLLM_ROUTER_TOKENIZER": "/tok"}
    unpinned, _ = command(pin=False)
    assert unpinned == cmd[3:]


def test_metrics_parsing() -> None:
    server = bench.parse_server_metrics(
        "\n".join(
            [
                "# TYPE inferencecache_matching_mode gauge",
                f'inferencecache_matching_mode{{model="{bench.MODEL}",requested="auto",mode="bytes"}} 1.0',
                "# TYPE inferencecache_byte_match_boundaries_total counter",
                f'inferencecache_byte_match_boundaries_total{{model="{bench.MODEL}",outcome="none"}} 5.0',
                f'inferencecache_byte_match_boundaries_total{{model="{bench.MODEL}",outcome="exact"}} 3.0',
                f'inferencecache_byte_match_boundaries_total{{model="{bench.MODEL}",outcome="end"}} 2.0',
                'inferencecache_byte_match_boundaries_total{model="other",outcome="exact"} 7.0',
                "# TYPE inferencecache_extproc_decision_seconds histogram",
                'inferencecache_extproc_decision_seconds_bucket{le="0.001"} 4.0',
                'inferencecache_extproc_decision_seconds_bucket{le="+Inf"} 6.0',
                "inferencecache_extproc_decision_seconds_count 6.0",
                "inferencecache_extproc_decision_seconds_sum 0.01",
            ]
        )
        + "\n"
    )
    assert server.mode == "bytes" and server.byte_matched == 5.0
    assert server.decisions == {"0.001": 4.0, "+Inf": 6.0, "count": 6.0, "sum": 0.01}
    router = bench_peers.router_lookups(
        "# TYPE vllm_router_kv_placement_lookups_total counter\n"
        'vllm_router_kv_placement_lookups_total{result="miss"} 3\n'
        'vllm_router_kv_placement_lookups_total{result="hit"} 1\n'
    )
    assert router == {"miss": 3.0, "hit": 1.0}


# -- targets ------------------------------------------------------------------------------------


def _cell(
    size: int, turn: str, added: tuple[float, float], vllm: tuple[float, float] | None
) -> dict[str, object]:
    return {
        "size_tokens": size,
        "turn": turn,
        "matching": "auto",
        "matching_mode": "bytes",
        "concurrency": 1,
        "added_p50_ms": added[0],
        "added_p99_ms": added[1],
        "server_capacity_rps": 600.0,
        "extproc_rps": 300.0,
        "vllm_kv_aware_added_p50_ms": vllm[0] if vllm else None,
        "vllm_kv_aware_added_p99_ms": vllm[1] if vllm else None,
    }


def test_targets_compare_with_vllm_router_per_size_and_envoy_at_8k() -> None:
    rows = [
        _cell(1024, "first", (1.0, 2.0), (5.0, 9.0)),
        _cell(1024, "follow-up", (1.2, 2.5), (5.0, 9.0)),
        _cell(8192, "first", (1.4, 2.9), (15.0, 30.0)),
        _cell(8192, "follow-up", (1.6, 3.5), (15.0, 3.0)),  # p99 above vllm-router's
    ]
    lines = bench.targets(rows)

    assert (
        "issue #6 target added latency below vllm-router kv_aware's at 1024 tokens, first, bytes: "
        "p50 1.0 vs 5.0 ms, p99 2.0 vs 9.0 ms (met)"
    ) in lines
    assert any(
        "at 8192 tokens, follow-up, bytes: p50 1.6 vs 15.0 ms, p99 3.5 vs 3.0 ms (NOT met)" in x
        for x in lines
    )
    assert (
        "issue #6 target added latency below vllm-router kv_aware's at every prompt size "
        "(1024, 8192): NOT met"
    ) in lines
    assert (
        "issue #6 target added p50 within 1.5 ms of Envoy alone at 8192 tokens, first, bytes: 1.4 ms (met)"
        in lines
    )
    assert (
        "issue #6 target added p50 within 1.5 ms of Envoy alone at 8192 tokens, follow-up, bytes: "
        "1.6 ms (NOT met)"
    ) in lines
    assert any(
        x.startswith("issue #9 target added p99 <= 1 ms at 8192 tokens, first, bytes: 2.9 ms") for x in lines
    )


def test_targets_say_when_vllm_router_was_not_measured() -> None:
    lines = bench.targets([_cell(1024, "first", (1.0, 2.0), None)])
    assert (
        "issue #6 target added latency below vllm-router kv_aware's: not measured (no vllm-router)" in lines
    )
    assert not any("within 1.5 ms" in x for x in lines)  # no 8k cell


def test_capacity_notes_say_when_first_turns_outgrow_the_server() -> None:
    def settings(sizes: tuple[int, ...], requests: int, matching: str) -> bench.Settings:
        return bench.Settings(sizes, requests, 20, 1, 4, TINY_TOKENIZER, False, matching=matching)

    assert bench.capacity_notes(settings((1024, 8192, 32768), 300, "auto")) == []
    (index_note,) = bench.capacity_notes(settings((32768,), 600, "auto"))
    assert "620 first turns of 32768 tokens store ~1,269,760 blocks" in index_note
    notes = bench.capacity_notes(settings((1024, 8192, 32768), 300, "tokens"))
    assert len(notes) == 1 and "tokenizer cache" in notes[0]


async def test_the_fronts_alternate_in_chunks() -> None:
    """Every front gets every body, in alternating chunks (a slow spell of the machine then
    lands on every front, not on one side of a comparison)."""
    arrivals: list[tuple[str, bytes]] = []

    def app(name: str) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            arrivals.append((name, await request.read()))
            status = 503 if name == "b" else 200
            return web.json_response({}, status=status, headers={bench.ENGINE_HEADER: name})

        a = web.Application()
        a.router.add_post(bench.CHAT_PATH, answer)
        return a

    bodies = [str(i).encode() for i in range(7)]
    async with (
        TestServer(app("a"), host="127.0.0.1") as a,
        TestServer(app("b"), host="127.0.0.1") as b,
        TestServer(app("c"), host="127.0.0.1") as c,
        aiohttp.ClientSession() as session,
    ):
        urls = [str(s.make_url("")).rstrip("/") for s in (a, b, c)]
        runs = await bench.drive_alternating(session, urls, bodies, concurrency=1, chunk=3)
    assert [name for name, _ in arrivals] == list("aaabbbcccaaabbbcccabc")
    for name in "abc":
        assert [body for n, body in arrivals if n == name] == bodies
    assert [len(r.latencies_ms) for r in runs] == [7, 7, 7]
    assert [r.errors for r in runs] == [0, 7, 0]
    assert [r.served for r in runs] == [["a"] * 7, ["b"] * 7, ["c"] * 7]
    assert all(r.wall_s > 0 for r in runs)
