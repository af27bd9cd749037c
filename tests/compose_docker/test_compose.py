"""``examples/envoy/docker-compose.yml`` with Docker (``make compose-test``): the image is
built, Envoy, the server and the four engines come up healthy, and the client's output keeps
the demo's promise, checked by the same code as the loopback run (``tests/compose/``).

Needs a Docker daemon with the compose plugin and ``testcontainers`` (the ``compose`` extra).
Publishes ports 10000 and 9901 on the host, as the demo does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from testcontainers.compose import DockerCompose

from ..compose import topology

ENGINES = ("engine-1", "engine-2", "engine-3", "engine-4")
CLIENT_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.timeout(1800),  # the first run builds the image (wheels, tokenizer)
    # testcontainers and the docker SDK may warn about their own deprecations.
    pytest.mark.filterwarnings("default::DeprecationWarning"),
]


@pytest.fixture(params=topology.ENVOY_CONFIGS)
def stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[DockerCompose]:
    """``docker compose up --build --wait envoy`` (and so the server and the engines) with
    ``ENVOY_CONFIG`` set to each shipped config; ``down --volumes`` at the end."""
    monkeypatch.setenv("ENVOY_CONFIG", request.param)
    compose = DockerCompose(
        context=str(topology.EXAMPLES),
        compose_file_name=topology.COMPOSE_FILE.name,
        build=True,
        wait=True,
        services=["envoy"],
    )
    down = [*compose.docker_compose_command(), "down", "--volumes", "--remove-orphans"]
    try:
        compose.start()
        yield compose
    finally:
        try:
            stdout, stderr = compose.get_logs()
            print(stdout, stderr)  # shown when the test fails
        finally:
            # The whole project (compose.stop() would take down only the services named).
            subprocess.run(down, cwd=topology.EXAMPLES, check=True, capture_output=True, timeout=120)


def test_client_through_envoy(stack: DockerCompose) -> None:
    for name in ("envoy", "extproc", *ENGINES):
        assert stack.get_container(name).Health == "healthy", name
    result = subprocess.run(
        [*stack.docker_compose_command(), "run", "--rm", "client"],
        cwd=topology.EXAMPLES,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = topology.load_compose()["services"]
    engines = [f"{topology.static_ip(services[e])}:8000" for e in ENGINES]
    conversations = int(topology.flag_value(topology.argv(services["client"], []), "--conversations"))
    topology.check_client_run(topology.parse_client_output(result.stdout), conversations, engines)
