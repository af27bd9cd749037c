"""The shipped Envoy configs and the helpers that adapt and check them.

Real: the Envoy binary (``--mode validate``). We test that every shipped config is valid
for Envoy 1.40 as shipped and as rewritten for loopback, that :func:`envoy.loopback`
changes addresses and nothing else, and the settings the README promises.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from inference_cache import envoy

from .conftest import CONFIGS, DESTINATION, EXTPROC_FILTER

#: Every shipped config. ``envoy-streamed.yaml`` is not in ``CONFIGS``: the stub picker the
#: routing tests parametrize over ``CONFIGS`` answers the request headers at once, which that
#: mode does not allow (it is exercised with our service in ``test_one_message.py``).
SHIPPED = {**CONFIGS, "streamed": CONFIGS["buffered"].parent / "envoy-streamed.yaml"}


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    hcm: dict[str, Any] = manager["typed_config"]
    return hcm


def _filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = _hcm(config)["http_filters"]
    return filters


def _ext_proc(config: dict[str, Any]) -> dict[str, Any]:
    (found,) = [f["typed_config"] for f in _filters(config) if f["name"] == EXTPROC_FILTER]
    return found


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return found


def _addresses(config: dict[str, Any]) -> list[Any]:
    """Every ``socket_address`` in the config, in document order."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "socket_address":
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config)
    return found


def _without_addresses(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every address replaced by a placeholder and the engine/ext_proc
    endpoint lists collapsed to one entry."""
    out = copy.deepcopy(config)
    for cluster in out["static_resources"]["clusters"]:
        if "load_assignment" in cluster:
            cluster["load_assignment"]["endpoints"] = "<members>"
    out["admin"]["address"] = "<admin>"
    out["static_resources"]["listeners"][0]["address"] = "<listener>"
    return out


@pytest.mark.parametrize("name", sorted(SHIPPED))
async def test_shipped_config_is_valid_for_envoy(name: str) -> None:
    await envoy.validate(envoy.load_config(SHIPPED[name]))


@pytest.mark.parametrize("name", sorted(SHIPPED))
async def test_loopback_config_is_valid_for_envoy(name: str) -> None:
    config = envoy.load_config(SHIPPED[name])
    engines = ["127.0.0.1:18001", "127.0.0.1:18002"]
    await envoy.validate(envoy.loopback(config, extproc="127.0.0.1:19002", engines=engines))


async def test_validate_reports_envoys_reason() -> None:
    config = envoy.load_config(CONFIGS["buffered"])
    _cluster(config, "ext_proc")["type"] = "NOT_A_TYPE"
    with pytest.raises(envoy.EnvoyError, match="NOT_A_TYPE"):
        await envoy.validate(config)


def test_every_shipped_config_is_tested() -> None:
    """Every Envoy config (``envoy-*.yaml``; the directory also holds compose files)."""
    assert sorted(p.name for p in CONFIGS["buffered"].parent.glob("envoy-*.yaml")) == sorted(
        p.name for p in SHIPPED.values()
    )


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_loopback_changes_only_addresses(name: str) -> None:
    config = envoy.load_config(SHIPPED[name])
    engines = ["127.0.0.1:18001", "127.0.0.1:18002"] if name == "override-host" else []
    rewritten = envoy.loopback(
        config,
        listen_port=18000,
        admin_port=18901,
        extproc=["127.0.0.1:19002", "127.0.0.1:19003"],
        engines=engines,
    )
    assert _without_addresses(rewritten) == _without_addresses(config)
    assert config == envoy.load_config(SHIPPED[name])  # the input is untouched
    # Every address is now a loopback one, at the given ports.
    assert {a["address"] for a in _addresses(rewritten)} == {"127.0.0.1"}
    ports = [a["port_value"] for a in _addresses(rewritten)]
    assert sorted(ports) == sorted([18901, 18000, 19002, 19003, *(int(e.rsplit(":")[1]) for e in engines)])


def test_loopback_lists_engines_only_where_the_config_has_members() -> None:
    original_dst = envoy.load_config(CONFIGS["buffered"])
    assert envoy.loopback(original_dst, extproc="127.0.0.1:1", engines=["127.0.0.1:2"]) == envoy.loopback(
        original_dst, extproc="127.0.0.1:1"
    )
    with pytest.raises(envoy.EnvoyError, match="at least one engine"):
        envoy.loopback(envoy.load_config(CONFIGS["override-host"]), extproc="127.0.0.1:1")
    with pytest.raises(envoy.EnvoyError, match="not a host:port"):
        envoy.loopback(original_dst, extproc="localhost")


def test_shipped_configs_are_written_for_the_compose_network() -> None:
    for config in map(envoy.load_config, SHIPPED.values()):
        assert config["admin"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9901}
        listener = config["static_resources"]["listeners"][0]
        assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10000}
        members = _addresses(_cluster(config, "ext_proc"))
        assert members == [{"address": "extproc", "port_value": 9002}]
    members = _addresses(_cluster(envoy.load_config(CONFIGS["override-host"]), "engines"))
    assert [(m["address"], m["port_value"]) for m in members] == [
        (f"172.28.0.{i}", 8000) for i in (21, 22, 23, 24)
    ]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_settings_every_config_relies_on(name: str) -> None:
    config = envoy.load_config(SHIPPED[name])
    names = [f["name"] for f in _filters(config)]
    # Client-sent destination headers are dropped before ext_proc sees or sets anything.
    assert names == ["envoy.filters.http.header_mutation", EXTPROC_FILTER, "envoy.filters.http.router"]
    (removal,) = _filters(config)[0]["typed_config"]["mutations"]["request_mutations"]
    assert removal == {"remove_on_match": {"key_matcher": {"prefix": DESTINATION}}}
    ext_proc = _ext_proc(config)
    assert ext_proc["metadata_options"] == {
        "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint", "envoy.lb"]},
        "receiving_namespaces": {"untyped": ["envoy.lb"]},
    }
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext_proc"
    if name == "streamed":  # no response message at all (see test_body_modes_and_failure_modes)
        assert "response_attributes" not in ext_proc
    else:
        assert ext_proc["response_attributes"] == ["upstream.address"]
        assert ext_proc["processing_mode"]["response_header_mode"] == "SEND"
    assert config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 16 * 1024 * 1024
    cluster = _cluster(config, "ext_proc")
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}


def test_body_modes_and_failure_modes() -> None:
    modes = {name: _ext_proc(envoy.load_config(path)) for name, path in SHIPPED.items()}
    assert modes["buffered"]["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert modes["buffered"]["processing_mode"]["response_body_mode"] == "NONE"
    assert modes["buffered"]["failure_mode_allow"] is False
    duplex = modes["duplex"]["processing_mode"]
    assert (duplex["request_body_mode"], duplex["response_body_mode"]) == ("FULL_DUPLEX_STREAMED",) * 2
    assert (duplex["request_trailer_mode"], duplex["response_trailer_mode"]) == ("SEND", "SEND")
    assert modes["duplex"]["failure_mode_allow"] is False
    assert modes["override-host"]["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert modes["override-host"]["failure_mode_allow"] is True
    # One round trip: the body is sent without waiting for our headers answer, and
    # mode_override is then ignored, so the response headers are skipped in the config.
    streamed = modes["streamed"]
    assert streamed["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        "response_trailer_mode": "SKIP",
    }
    assert streamed["send_body_without_waiting_for_header_response"] is True
    assert "allow_mode_override" not in streamed
    assert streamed["failure_mode_allow"] is False
    for name in ("buffered", "duplex", "override-host"):
        assert "send_body_without_waiting_for_header_response" not in modes[name]


def test_find_envoy_prefers_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(envoy.ENVOY_ENV, str(fake))
    assert envoy.find_envoy() == str(fake)
    monkeypatch.setenv(envoy.ENVOY_ENV, str(tmp_path / "missing"))
    with pytest.raises(envoy.EnvoyError, match="make envoy"):
        envoy.find_envoy()


def test_find_envoy_falls_back_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(envoy.ENVOY_ENV, raising=False)
    found = Path(envoy.find_envoy())
    assert found == Path(__file__).resolve().parents[2] / envoy.ENVOY_RELPATH


def test_parse_stats() -> None:
    text = "cluster.a.upstream_rq_200: 3\nserver.state: 0\ncluster.a.histo: P0(nan,1) P25(nan,2)\n"
    assert envoy.parse_stats(text) == {
        "cluster.a.upstream_rq_200": 3,
        "server.state": 0,
        "cluster.a.histo": "P0(nan,1) P25(nan,2)",
    }
