"""``examples/envoy/docker-compose.yml``, its server config, the shipped Envoy configs and the
Dockerfile agree with each other: addresses, ports, images, commands, health checks.

Docker cannot run here; these checks read the files (``make compose-test`` runs them with
Docker), and ``test_loopback.py`` runs the same commands and files on loopback.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
import urllib.parse
from typing import Any

import pytest

from inference_cache import config as config_mod
from inference_cache import envoy
from inference_cache.extproc import serve

from . import topology

ENGINES = ("engine-1", "engine-2", "engine-3", "engine-4")
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
OUR_IMAGE = "inference-cache:dev"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return topology.load_compose(env={})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = compose["services"]
    return services


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return topology.dockerfile_instructions(topology.DOCKERFILE.read_text(encoding="utf-8"))


def _entrypoint(dockerfile: list[tuple[str, str]]) -> list[str]:
    final = topology.final_stage(dockerfile)
    entrypoint: list[str] = json.loads(next(rest for k, rest in final if k == "ENTRYPOINT"))
    return entrypoint


def _serve_args(services: dict[str, Any], dockerfile: list[tuple[str, str]]) -> Any:
    """The server's command parsed by the real ``serve`` flag parser."""
    args = topology.argv(services["extproc"], _entrypoint(dockerfile))
    assert args[:2] == ["inference-cache", "serve"], args
    parser = serve.argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(args[2:])


def _serve_config(services: dict[str, Any], dockerfile: list[tuple[str, str]]) -> config_mod.Config:
    path = _serve_args(services, dockerfile).config
    return config_mod.load(topology.volumes(services["extproc"])[path])


def test_services_images_and_static_ips(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert set(services) == {"envoy", "extproc", "client", *ENGINES}
    (subnet,) = compose["networks"]["llm"]["ipam"]["config"]
    network = ipaddress.ip_network(subnet["subnet"])
    assert network == ipaddress.ip_network("172.28.0.0/16")
    ips = {name: topology.static_ip(s) for name, s in services.items()}
    assert len(set(ips.values())) == len(ips), ips
    assert all(ipaddress.ip_address(ip) in network for ip in ips.values()), ips
    assert [ips[e] for e in ENGINES] == ["172.28.0.21", "172.28.0.22", "172.28.0.23", "172.28.0.24"]
    assert services["envoy"]["image"] == ENVOY_IMAGE
    for name in ("extproc", "client", *ENGINES):
        assert services[name]["image"] == OUR_IMAGE, name
        build = services[name]["build"]
        assert (topology.EXAMPLES / build["context"] / build["dockerfile"]).resolve() == topology.DOCKERFILE


def test_every_volume_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, source in topology.volumes(service).items():
            assert source.is_file(), (name, target, source)


@pytest.mark.parametrize("envoy_config", topology.ENVOY_CONFIGS)
def test_envoy_config_is_selected_by_environment(envoy_config: str) -> None:
    services = topology.load_compose(env={"ENVOY_CONFIG": envoy_config})["services"]
    mounted = topology.volumes(services["envoy"])["/etc/envoy/envoy.yaml"]
    assert mounted == topology.EXAMPLES / envoy_config
    assert services["envoy"]["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]


def test_envoy_config_defaults_to_buffered(services: dict[str, Any]) -> None:
    mounted = topology.volumes(services["envoy"])["/etc/envoy/envoy.yaml"]
    assert mounted.name == "envoy-buffered.yaml"


def test_engines_run_the_fake_engine_on_the_compose_addresses(
    services: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    config = _serve_config(services, dockerfile)
    (model,) = config.models
    tokenizer_in_image = set(topology.image_paths(topology.final_stage(dockerfile)))
    for name in ENGINES:
        args = topology.argv(services[name], _entrypoint(dockerfile))
        assert args[:2] == ["inference-cache", "fake-engine"], args
        flag = lambda f, a=args: topology.flag_value(a, f)  # noqa: E731
        assert (flag("--host"), flag("--port")) == ("0.0.0.0", "8000")
        assert flag("--kv-events-endpoint") == "tcp://*:5557"
        assert flag("--replay-endpoint") == "tcp://*:5558"
        assert flag("--model") == model.name
        assert int(flag("--block-size")) == model.block_size
        assert flag("--tokenizer") == model.tokenizer
        assert flag("--tokenizer") in tokenizer_in_image
        health = services[name]["environment"]["HEALTHCHECK_URL"]
        assert urllib.parse.urlsplit(health).port == 8000


def test_server_config_lists_exactly_the_engines(
    services: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    config = _serve_config(services, dockerfile)
    expected = [topology.static_ip(services[e]) for e in ENGINES]
    assert [e.address for e in config.endpoints] == [f"{ip}:8000" for ip in expected]
    assert [e.kv_events for e in config.endpoints] == [f"tcp://{ip}:5557" for ip in expected]
    assert [e.replay for e in config.endpoints] == [f"tcp://{ip}:5558" for ip in expected]
    assert [e.metrics_url for e in config.endpoints] == [f"http://{ip}:8000/metrics" for ip in expected]
    # The server starts with these flags and the mounted file (serve's own validation).
    args = _serve_args(services, dockerfile)
    args.config = str(topology.volumes(services["extproc"])[args.config])
    loaded = serve.load_config(args, environ={})
    assert loaded.endpoints == config.endpoints
    assert loaded.server.extproc_bind_address == ":9002"


@pytest.mark.parametrize("envoy_config", topology.ENVOY_CONFIGS)
def test_envoy_configs_point_at_the_compose_services(
    envoy_config: str, services: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    shipped = envoy.load_config(topology.EXAMPLES / envoy_config)
    clusters = {c["name"]: c for c in shipped["static_resources"]["clusters"]}

    def members(cluster: str) -> list[str]:
        return [
            f"{e['endpoint']['address']['socket_address']['address']}:"
            f"{e['endpoint']['address']['socket_address']['port_value']}"
            for group in clusters[cluster]["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]

    extproc_port = config_mod.split_host_port(_serve_args(services, dockerfile).extproc_bind_address)[1]
    assert members(envoy.EXTPROC_CLUSTER) == [f"extproc:{extproc_port}"]
    if envoy.ENGINE_CLUSTER in clusters:  # override-host: the engines are listed
        assert members(envoy.ENGINE_CLUSTER) == [f"{topology.static_ip(services[e])}:8000" for e in ENGINES]
    (listener,) = shipped["static_resources"]["listeners"]
    listen_port = listener["address"]["socket_address"]["port_value"]
    admin_port = shipped["admin"]["address"]["socket_address"]["port_value"]
    assert f"{listen_port}:{listen_port}" in services["envoy"]["ports"]
    client_url = topology.flag_value(topology.argv(services["client"], []), "--url")
    assert client_url == f"http://envoy:{listen_port}"
    assert f"/dev/tcp/127.0.0.1/{admin_port}" in " ".join(services["envoy"]["healthcheck"]["test"])


def test_health_checks_gate_the_start_order(services: dict[str, Any]) -> None:
    def healthy_deps(name: str) -> set[str]:
        deps = services[name]["depends_on"]
        assert all(d["condition"] == "service_healthy" for d in deps.values()), deps
        return set(deps)

    assert healthy_deps("client") == {"envoy"}
    assert healthy_deps("envoy") == {"extproc"}
    assert healthy_deps("extproc") == set(ENGINES)
    for name in ("envoy", "extproc", *ENGINES):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["client"]["healthcheck"] == {"disable": True}


def test_dockerfile_image(dockerfile: list[tuple[str, str]], services: dict[str, Any]) -> None:
    final = topology.final_stage(dockerfile)
    keywords = [k for k, _ in final]
    user = next(rest for k, rest in reversed(final) if k == "USER")
    assert user.split(":")[0] not in ("root", "0"), user
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "python:3.11-slim" in next(rest for k, rest in dockerfile if k == "ARG")
    assert _entrypoint(dockerfile) == ["inference-cache"]
    assert json.loads(next(rest for k, rest in final if k == "CMD"))[0] == "serve"
    assert set(next(rest for k, rest in final if k == "EXPOSE").split()) == {"9090", "9002", "8080", "8081"}
    healthcheck = next(rest for k, rest in final if k == "HEALTHCHECK")
    assert "urllib.request" in healthcheck and "HEALTHCHECK_URL" in healthcheck
    env = next(rest for k, rest in final if k == "ENV")
    http_port = config_mod.split_host_port(_serve_args(services, dockerfile).http_bind_address)[1]
    assert f"HEALTHCHECK_URL=http://127.0.0.1:{http_port}/healthz" in env
    assert "envoy" not in " ".join(rest for k, rest in final if k in ("RUN", "COPY")).lower()
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in dockerfile)


def test_dockerfile_and_dockerignore_carry_every_package_folder() -> None:
    pyproject = tomllib.loads((topology.REPO / "pyproject.toml").read_text(encoding="utf-8"))
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {
        rest.split()[0]
        for k, rest in topology.dockerfile_instructions(topology.DOCKERFILE.read_text(encoding="utf-8"))
        if k == "COPY" and not rest.startswith("--from")
    }
    assert folders <= copied, folders - copied
    allowed = {
        line.strip()[1:].rstrip("/")
        for line in (topology.REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    assert {*folders, "pyproject.toml", "README.md", "hack/build_qwen_tokenizer.py"} <= allowed
