"""``inference-cache bench extproc``: a tiny real run (Envoy, the server process, echo
engines) checks the JSON shape; no timing is asserted. Plus the pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_cache import cli, envoy
from inference_cache.extproc import bench

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"

CELL_KEYS = {
    "size_tokens",
    "turn",
    "matching",
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
    "errors",
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("envoy_config", [None, "envoy-streamed.yaml", "envoy-override-host.yaml"])
def test_a_tiny_run_writes_one_object_per_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], envoy_config: str | None
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "extproc", "--sizes", "64,128", "--requests", "4", "--warmup", "1"]
    argv += ["--concurrency", "2", "--engines", "2", "--no-taskset"]
    argv += ["--tokenizer", str(TINY_TOKENIZER), "--json", str(out)]
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
    # Follow-ups hit the KV index on the engine that served the first turn (full blocks).
    assert all(c["index_matched_tokens"] >= bench.BLOCK_SIZE for c in cells if c["turn"] == "follow-up")
    assert all(c["index_matched_tokens"] is None for c in cells if c["turn"] == "first")
    assert "| size | turn |" in capsys.readouterr().out


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
def test_matching_bytes_measures_first_turns_by_bytes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "extproc", "--sizes", "64", "--requests", "3", "--warmup", "1", "--matching", "bytes"]
    argv += ["--concurrency", "1", "--engines", "2", "--no-taskset", "--tokenizer", str(TINY_TOKENIZER)]
    argv += ["--json", str(out)]

    assert cli.main(argv) == 0

    cells = json.loads(out.read_text())
    assert [(c["size_tokens"], c["turn"], c["matching"]) for c in cells] == [(64, "first", "bytes")]
    assert cells[0]["errors"] == 0


def test_the_server_config_carries_the_matching() -> None:
    cfg = bench.server_config(TINY_TOKENIZER, ["127.0.0.1:1"], "/tmp/x", "bytes")
    assert cfg["models"][0]["matching"] == "bytes"
