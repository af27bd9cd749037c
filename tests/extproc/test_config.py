"""``inference_cache.config``: strict YAML decoding, validation messages, precedence.

Nothing is mocked: documents are parsed from strings; the example file is the one
``make run`` uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from inference_cache import config
from inference_cache.extproc import serve

REPO = Path(__file__).resolve().parents[2]

BASE = """
models:
  - name: m
    block_size: 32
    lora_adapters: [{name: sql, id: 1}]
endpoints:
  - address: 10.0.0.1:8000
    model: m
    tenant: team-a
    kv_events: tcp://10.0.0.1:5557
"""


def test_example_config_is_valid_and_as_documented() -> None:
    cfg = config.load(REPO / "examples" / "serve.yaml")
    assert [m.name for m in cfg.models] == ["demo-model"]
    assert cfg.models[0].block_size == 16
    assert cfg.models[0].tokenizer is None
    assert [e.address for e in cfg.endpoints] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert all(e.kv_events.startswith("tcp://127.0.0.1:") for e in cfg.endpoints)


def test_decodes_every_field_with_defaults() -> None:
    cfg = config.parse(BASE)
    assert cfg.models[0] == config.ModelConfig(
        name="m", block_size=32, lora_adapters=(config.LoraAdapter("sql", 1),)
    )
    e = cfg.endpoints[0]
    assert (e.tenant, e.kv_events_bind, e.replay, e.topic, e.metrics_url) == ("team-a", False, None, "", None)
    assert cfg.health_interval_s == 2.0
    assert cfg.server == config.ServerSettings()
    assert cfg.tenant_of("m") == "team-a"
    assert cfg.tenant_of("unknown") == ""


def test_empty_document_is_the_default_config() -> None:
    assert config.parse("") == config.Config()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param(
            BASE.replace("model: m", "modle: m"),
            "endpoints[0].modle: unknown key; expected one of address, data_parallel_size, engine, kv_events",
            id="unknown-key",
        ),
        pytest.param("server: {grpc_port: 1}", "server.grpc_port: unknown key", id="unknown-server-key"),
        pytest.param(
            BASE.replace("block_size: 32", "block_size: '32'"),
            "models[0].block_size: expected an integer, got str '32'",
            id="string-for-int",
        ),
        pytest.param(
            BASE.replace("block_size: 32", "block_size: true"),
            "models[0].block_size: expected an integer, got boolean True",
            id="bool-for-int",
        ),
        pytest.param(
            "server: {insecure_disable_auth: 'yes'}",
            "server.insecure_disable_auth: expected a boolean, got str 'yes'",
            id="string-for-bool",
        ),
        pytest.param(
            "models: {name: m}", "models: expected a list of a mapping, got a mapping", id="map-for-list"
        ),
        pytest.param("- a", "the top level: expected a mapping, got a list", id="top-level-list"),
        pytest.param(
            BASE.replace("    model: m\n", ""),
            "endpoints[0].model: required key is missing",
            id="missing-required",
        ),
        pytest.param(
            BASE.replace("model: m\n    tenant", "model: other\n    tenant"),
            "endpoints[0].model: unknown model 'other'; add it under models: (known: m)",
            id="unknown-model",
        ),
        pytest.param(
            BASE + "  - {address: '10.0.0.2:8000', model: m, kv_events: 'tcp://10.0.0.2:5557'}\n",
            "endpoints[1].tenant: '' differs from endpoints[0].tenant 'team-a'; "
            "all endpoints of model 'm' must share one tenant",
            id="tenant-mix",
        ),
        pytest.param(
            BASE + "  - {address: '10.0.0.1:8000', model: m, tenant: team-a, kv_events: 'tcp://x:1'}\n",
            "endpoints[1].address: '10.0.0.1:8000' is already endpoints[0]",
            id="duplicate-address",
        ),
        pytest.param(
            BASE.replace("10.0.0.1:8000", "engine-0:8000"),
            "endpoints[0].address: 'engine-0:8000' must be ip:port",
            id="hostname-address",
        ),
        pytest.param(
            BASE.replace("tcp://10.0.0.1:5557", "10.0.0.1:5557"),
            "endpoints[0].kv_events: '10.0.0.1:5557' must be a ZMQ endpoint",
            id="kv-events-not-zmq",
        ),
        pytest.param(
            BASE + "    metrics_url: 10.0.0.1:8000/metrics\n",
            "endpoints[0].metrics_url: '10.0.0.1:8000/metrics' must be an http(s) URL",
            id="metrics-url",
        ),
        pytest.param(
            BASE.replace("block_size: 32", "block_size: 0"),
            "models[0].block_size: must be > 0",
            id="block-size",
        ),
        pytest.param(
            BASE + "health_interval_s: 0\n", "health_interval_s: must be > 0 seconds", id="health-interval"
        ),
        pytest.param(
            BASE.replace("{name: sql, id: 1}", "{name: sql, id: 1}, {name: sql2, id: 1}"),
            "models[0].lora_adapters[1].id: must be a positive LoRA id, unique",
            id="lora-id",
        ),
        pytest.param("models: [{name: m}, {name: m}]", "models[1].name: duplicate model 'm'", id="dup-model"),
        pytest.param(
            BASE + "    engine: trtllm\n",
            "endpoints[0].engine: 'trtllm' is not one of vllm, sglang",
            id="engine",
        ),
        pytest.param(
            BASE + "    data_parallel_size: 0\n",
            "endpoints[0].data_parallel_size: must be >= 1",
            id="dp-size",
        ),
        pytest.param(
            BASE.replace("tcp://10.0.0.1:5557", "ipc:///tmp/ev") + "    data_parallel_size: 2\n",
            "endpoints[0].data_parallel_size: ranks publish on port + rank, so kv_events must be tcp://",
            id="dp-needs-tcp",
        ),
        pytest.param("models: [", "not valid YAML", id="yaml-syntax"),
        pytest.param("stats_interval_s: 0\n", "stats_interval_s: must be > 0 seconds", id="stats-interval"),
        pytest.param("limits: {max_body_bytes: 0}", "limits.max_body_bytes: must be > 0", id="limits"),
        pytest.param("limits: {shed_ttft_ms: -1}", "limits.shed_ttft_ms: must be >= 0", id="shed"),
        pytest.param("limits: {max_bodyy: 1}", "limits.max_bodyy: unknown key", id="limits-key"),
        pytest.param(
            "scoring: {prefill_tokens_per_s: 0}", "scoring.prefill_tokens_per_s must be > 0", id="scoring"
        ),
        pytest.param(
            "scoring: {waiting_request_ms: -5}", "scoring.waiting_request_ms", id="scoring-negative"
        ),
    ],
)
def test_rejections_name_the_key_and_the_fix(doc: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(doc)
    assert message in str(exc.value)


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"--config .*missing\.yaml: cannot read"):
        config.load(tmp_path / "missing.yaml")


def test_precedence_flag_over_env_over_file_over_default() -> None:
    file = config.ServerSettings(grpc_bind_address="1.1.1.1:1", http_bind_address="1.1.1.1:2")
    env = {
        "INFERENCE_CACHE_GRPC_BIND_ADDRESS": "2.2.2.2:1",
        "INFERENCE_CACHE_HTTP_BIND_ADDRESS": "2.2.2.2:2",
        "INFERENCE_CACHE_LOG_LEVEL": "debug",
        "INFERENCE_CACHE_INSECURE_DISABLE_AUTH": "true",
        "INFERENCE_CACHE_ALLOWED_PRODUCER_SA": "a, b,",
    }
    merged = config.merge_server(file, {"grpc_bind_address": "3.3.3.3:1"}, env)
    assert merged.grpc_bind_address == "3.3.3.3:1"  # flag
    assert merged.http_bind_address == "2.2.2.2:2"  # env over file
    assert merged.log_level == "debug"  # env over default
    assert merged.insecure_disable_auth is True
    assert merged.allowed_producer_sa == ("a", "b")
    assert merged.snapshot_bind_address == ":8081"  # default


def test_bad_env_boolean_is_rejected_naming_the_variable() -> None:
    with pytest.raises(config.ConfigError, match="INFERENCE_CACHE_INSECURE_DISABLE_AUTH: expected a boolean"):
        config.merge_server(config.ServerSettings(), {}, {"INFERENCE_CACHE_INSECURE_DISABLE_AUTH": "maybe"})


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_flags_override_the_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {grpc_bind_address: '127.0.0.1:1', log_format: text, insecure_disable_auth: true}\n"
    )
    cfg = serve.load_config(
        _args(
            "--config",
            str(path),
            "--grpc-bind-address",
            "127.0.0.1:2",
            "--allowed-producer-sa",
            "a,b",
            "--allowed-producer-sa",
            "c",
        ),
        {"INFERENCE_CACHE_LOG_FORMAT": "json", "INFERENCE_CACHE_GRPC_BIND_ADDRESS": "127.0.0.1:3"},
    )
    assert cfg.server.grpc_bind_address == "127.0.0.1:2"
    assert cfg.server.log_format == "json"
    assert cfg.server.insecure_disable_auth is True
    assert cfg.server.allowed_producer_sa == ("a", "b", "c")


def test_go_style_single_dash_flags() -> None:
    args = _args("-grpc-bind-address", "127.0.0.1:1", "-allowed-producer-sa=a", "-insecure-disable-auth")
    assert (args.grpc_bind_address, args.allowed_producer_sa, args.insecure_disable_auth) == (
        "127.0.0.1:1",
        ["a"],
        True,
    )


def test_go_style_boolean_flag_values() -> None:
    assert _args("--insecure-disable-auth").insecure_disable_auth is True
    assert _args("--insecure-disable-auth=false").insecure_disable_auth is False
    assert _args().insecure_disable_auth is None  # absent: the env/file/default decide


def test_data_parallel_ranks_reach_the_subscriber_as_one_replica() -> None:
    from inference_cache.extproc import endpoints

    cfg = config.parse(
        BASE + "    replay: tcp://10.0.0.1:5657\n    data_parallel_size: 2\n    engine: sglang\n"
    )
    kv = endpoints.kv_endpoint(cfg.endpoints[0], cfg.models[0])
    assert (kv.replica_id, kv.engine, kv.data_parallel_size) == ("10.0.0.1:8000", "sglang", 2)
    assert kv.rank_endpoints() == [
        (0, "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5657"),
        (1, "tcp://10.0.0.1:5558", "tcp://10.0.0.1:5658"),
    ]


TEMPLATES = """
templates:
  - namespace: team-a
    name: support
    spec:
      body: "You are {{.persona}}. {{.question}}"
      slots:
        - {name: persona, type: Stable, required: true}
        - {name: question, type: Mutable}
"""


def test_templates_section_reaches_the_server_store() -> None:
    cfg = config.parse(BASE + TEMPLATES)
    assert [(t.namespace, t.name) for t in cfg.templates] == [("team-a", "support")]
    assert cfg.templates[0].spec["slots"][0]["name"] == "persona"
    (stored,) = serve.load_templates(cfg)
    assert (stored.ref, stored.spec.is_chat) == ("team-a/support", False)
    assert config.parse(BASE).templates == ()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param("templates: {}", r"^templates: expected a list of a mapping", id="not-a-list"),
        pytest.param(
            "templates: [{namespace: a, name: b}]",
            r"^templates\[0\]\.spec: required key is missing",
            id="no-spec",
        ),
        pytest.param(
            "templates: [{namespace: a, name: b, spec: 3}]",
            r"^templates\[0\]\.spec: expected a mapping",
            id="spec-type",
        ),
        pytest.param(
            "templates: [{namespace: a, name: b, spec: {body: '{{.x}}'}}]",
            r"^templates\[0\]\.spec\.body \(line 1, column 1\): slot 'x' is not declared",
            id="spec-error",
        ),
        pytest.param(
            "templates: [{namespace: A, name: b, spec: {body: x}}]",
            r"^templates\[0\]\.namespace: 'A' is not a namespace name",
            id="namespace",
        ),
        pytest.param(
            "templates: [{namespace: a, name: b, spec: {body: x}}, {namespace: a, name: b, spec: {body: y}}]",
            r"^templates\[1\]: a/b is already templates\[0\]",
            id="duplicate",
        ),
    ],
)
def test_templates_rejections_name_the_path(doc: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.parse(doc)


def test_server_settings_round_trip_through_a_config_file() -> None:
    settings = config.ServerSettings.loopback(log_format="text", allowed_producer_sa=("ns:a", "ns:b"))
    text = yaml.safe_dump({"server": settings.file_section()})
    assert config.parse(text).server == settings
