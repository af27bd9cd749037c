"""The translation from compose to loopback (``topology``), on small inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import topology


def test_interpolate_takes_the_environment_then_the_default() -> None:
    text = "./${ENVOY_CONFIG:-envoy-buffered.yaml}:/etc/envoy/envoy.yaml"
    assert topology.interpolate(text, {}) == "./envoy-buffered.yaml:/etc/envoy/envoy.yaml"
    assert topology.interpolate(text, {"ENVOY_CONFIG": ""}) == "./envoy-buffered.yaml:/etc/envoy/envoy.yaml"
    assert topology.interpolate(text, {"ENVOY_CONFIG": "x.yaml"}) == "./x.yaml:/etc/envoy/envoy.yaml"
    assert topology.interpolate("${A}-${B:-b}", {"A": "a"}) == "a-b"
    with pytest.raises(topology.TopologyError, match="A"):
        topology.interpolate("${A}", {})


def test_argv_is_the_entrypoint_then_the_command() -> None:
    assert topology.argv({"command": ["serve", "--x", "1"]}, ["inference-cache"]) == [
        "inference-cache",
        "serve",
        "--x",
        "1",
    ]
    assert topology.argv({"entrypoint": ["python", "/c.py"], "command": "--url http://e:1"}, ["ic"]) == [
        "python",
        "/c.py",
        "--url",
        "http://e:1",
    ]
    assert topology.argv({}, ["ic"]) == ["ic"]


def test_rewrite_argv_changes_flag_values_paths_and_the_program_only() -> None:
    args = ["inference-cache", "fake-engine", "--host", "0.0.0.0", "--port=8000", "--tokenizer", "/opt/t"]
    assert topology.rewrite_argv(
        args,
        flags={"--host": "127.0.0.1", "--port": "0"},
        paths={"/opt/t": Path("/home/t")},
        programs={"inference-cache": "/venv/bin/inference-cache"},
    ) == [
        "/venv/bin/inference-cache",
        "fake-engine",
        "--host",
        "127.0.0.1",
        "--port=0",
        "--tokenizer",
        "/home/t",
    ]
    assert topology.rewrite_argv(args) == args


def test_rewrite_argv_refuses_a_flag_the_command_does_not_have() -> None:
    with pytest.raises(topology.TopologyError, match="--replay-endpoint"):
        topology.rewrite_argv(["x", "--host", "a"], flags={"--replay-endpoint": "tcp://127.0.0.1:*"})
    with pytest.raises(topology.TopologyError):  # a flag with no value after it
        topology.rewrite_argv(["x", "--host"], flags={"--host": "b"})


def test_flag_value() -> None:
    assert topology.flag_value(["a", "--config", "/etc/c"], "--config") == "/etc/c"
    assert topology.flag_value(["a", "--config=/etc/c"], "--config") == "/etc/c"
    with pytest.raises(topology.TopologyError):
        topology.flag_value(["a"], "--config")


def test_rewrite_strings_replaces_addresses_inside_nested_values() -> None:
    data = {
        "endpoints": [
            {"address": "172.28.0.21:8000", "metrics_url": "http://172.28.0.21:8000/metrics", "block": 16},
            {"kv_events": "tcp://172.28.0.21:5557", "other": "172.28.0.2:8000"},
        ],
        "tokenizer": "/opt/tok",
    }
    out = topology.rewrite_strings(
        data,
        {"172.28.0.21:8000": "127.0.0.1:41", "172.28.0.21:5557": "127.0.0.1:42", "/opt/tok": "/h/tok"},
    )
    assert out == {
        "endpoints": [
            {"address": "127.0.0.1:41", "metrics_url": "http://127.0.0.1:41/metrics", "block": 16},
            {"kv_events": "tcp://127.0.0.1:42", "other": "172.28.0.2:8000"},
        ],
        "tokenizer": "/h/tok",
    }
    assert data["tokenizer"] == "/opt/tok"  # a copy


def test_volumes_resolve_relative_to_the_compose_file(tmp_path: Path) -> None:
    service = {"volumes": ["./serve.yaml:/etc/ic/serve.yaml:ro", "../x:/x"]}
    assert topology.volumes(service, tmp_path / "a") == {
        "/etc/ic/serve.yaml": tmp_path / "a" / "serve.yaml",
        "/x": tmp_path / "x",
    }


DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM python:3.11-slim AS tok
RUN build \\
 && more
FROM python:3.11-slim
# a comment
COPY --from=tok /tokenizers/qwen /opt/ic/qwen
COPY local /elsewhere
USER 10001
ENTRYPOINT ["inference-cache"]
"""


def test_dockerfile_instructions_join_continuations_and_drop_comments() -> None:
    instructions = topology.dockerfile_instructions(DOCKERFILE)
    assert [k for k, _ in instructions] == ["FROM", "RUN", "FROM", "COPY", "COPY", "USER", "ENTRYPOINT"]
    assert instructions[1] == ("RUN", "build  && more")
    assert topology.final_stage(instructions)[0] == ("FROM", "python:3.11-slim")
    assert topology.image_paths(instructions) == {"/opt/ic/qwen": "/tokenizers/qwen"}


CLIENT_OUTPUT = """\
client: 2 conversations through http://envoy:10000 (model demo-model)
conversation 1 turn 1: engine 172.28.0.21:8000 status 200 prompt_tokens 415 cached_tokens 0
conversation 2 turn 1: engine 172.28.0.22:8000 status 200 prompt_tokens 415 cached_tokens 0
conversation 1 turn 2: engine 172.28.0.21:8000 status 200 prompt_tokens 442 cached_tokens 416
conversation 2 turn 2: engine {second} status 200 prompt_tokens 442 cached_tokens {cached}
{verdict}: 4/4 requests answered
"""
ENGINES = ["172.28.0.21:8000", "172.28.0.22:8000"]


def test_client_output_is_parsed_and_checked() -> None:
    text = CLIENT_OUTPUT.format(second="172.28.0.22:8000", cached=416, verdict="OK")
    run = topology.parse_client_output(text)
    assert run.turn(2)[1] == topology.Request(1, 2, "172.28.0.21:8000", 200, 442, 416)
    assert run.verdict.startswith("OK:")
    topology.check_client_run(run, 2, ENGINES)


@pytest.mark.parametrize(
    ("second", "cached", "verdict"),
    [
        ("172.28.0.21:8000", 416, "OK"),  # the follow-up left its engine
        ("172.28.0.22:8000", 0, "OK"),  # nothing cached
        ("172.28.0.22:8000", 416, "FAIL"),  # the client's own verdict
    ],
)
def test_client_check_fails_on_a_broken_promise(second: str, cached: int, verdict: str) -> None:
    run = topology.parse_client_output(CLIENT_OUTPUT.format(second=second, cached=cached, verdict=verdict))
    with pytest.raises(AssertionError):
        topology.check_client_run(run, 2, ENGINES)


def test_client_check_fails_on_an_unknown_engine_or_a_missing_request() -> None:
    run = topology.parse_client_output(
        CLIENT_OUTPUT.format(second="172.28.0.22:8000", cached=1, verdict="OK")
    )
    with pytest.raises(AssertionError):
        topology.check_client_run(run, 2, ENGINES[:1])
    with pytest.raises(AssertionError):
        topology.check_client_run(run, 3, ENGINES)
