"""The docker-compose demo as data: parse ``examples/envoy/docker-compose.yml`` and the
Dockerfile, and translate what compose runs into what runs on loopback.

Owner: ``tests/compose/`` (also used by ``tests/compose_docker/``). The loopback run takes
every service's command from the compose file and changes only addresses, ports and
container paths: listen addresses become ``127.0.0.1`` with ephemeral ports, the compose
network's ``ip:port`` become the loopback ones the processes bound, a container path becomes
the host file mounted (or built into the image) there, and the image's entrypoint becomes
the venv's console script. Everything here is pure; the processes live in the tests.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "envoy"
COMPOSE_FILE = EXAMPLES / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENVOY_CONFIGS = ("envoy-buffered.yaml", "envoy-duplex.yaml", "envoy-override-host.yaml")

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class TopologyError(ValueError):
    """The compose file or the Dockerfile is not what the translation expects."""


# -- compose -------------------------------------------------------------------------------


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}`` and ``${VAR:-default}`` (empty or unset -> default)."""

    def value(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        found = env.get(name, "")
        if found:
            return found
        if default is None:
            raise TopologyError(f"${{{name}}} is unset and has no default")
        return default

    return _VARIABLE.sub(value, text)


def load_compose(path: Path = COMPOSE_FILE, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file with its variables substituted (``env``: ``os.environ`` by default)."""
    text = interpolate(path.read_text(encoding="utf-8"), os.environ if env is None else env)
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("services"), dict):
        raise TopologyError(f"{path}: no services")
    return loaded


def volumes(service: Mapping[str, Any], base: Path = EXAMPLES) -> dict[str, Path]:
    """Bind mounts of a service: container path -> host path (relative to the compose file)."""
    out: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        out[target] = (base / source).resolve()
    return out


def static_ip(service: Mapping[str, Any], network: str = "llm") -> str:
    return str(service["networks"][network]["ipv4_address"])


def argv(service: Mapping[str, Any], image_entrypoint: Sequence[str]) -> list[str]:
    """What the container runs: its entrypoint (the service's, else the image's) + command."""
    entrypoint = service.get("entrypoint", list(image_entrypoint))
    command = service.get("command", [])
    split = shlex.split
    return [
        *(split(entrypoint) if isinstance(entrypoint, str) else entrypoint),
        *(split(command) if isinstance(command, str) else command),
    ]


def flag_value(args: Sequence[str], flag: str) -> str:
    """The value of ``--flag value`` or ``--flag=value``."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    raise TopologyError(f"{flag} not in {list(args)}")


def rewrite_argv(
    args: Sequence[str],
    *,
    flags: Mapping[str, str] = {},
    paths: Mapping[str, str | os.PathLike[str]] = {},
    programs: Mapping[str, str] = {},
) -> list[str]:
    """``args`` with the program replaced (``programs``), the value of every flag in
    ``flags`` replaced (``--flag value`` and ``--flag=value``), and every argument that is a
    container path in ``paths`` replaced by the host path. A flag of ``flags`` absent from
    ``args`` is an error: the compose file cannot change under the test unnoticed."""
    out = list(args)
    if out and out[0] in programs:
        out[0] = programs[out[0]]
    for flag, new in flags.items():
        for i, arg in enumerate(out):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = new
                break
            if arg.startswith(flag + "="):
                out[i] = f"{flag}={new}"
                break
        else:
            raise TopologyError(f"{flag} not in {list(args)}")
    return [str(paths[a]) if a in paths else a for a in out]


def rewrite_strings(data: Any, replacements: Mapping[str, str]) -> Any:
    """``data`` (parsed YAML) with every string's occurrences of each key replaced by its
    value (``172.28.0.21:8000`` -> ``127.0.0.1:41234``; a whole container path -> a host
    path); keys applied longest first."""
    keys = sorted(replacements, key=len, reverse=True)
    if isinstance(data, str):
        for key in keys:
            data = data.replace(key, replacements[key])
        return data
    if isinstance(data, list):
        return [rewrite_strings(v, replacements) for v in data]
    if isinstance(data, dict):
        return {k: rewrite_strings(v, replacements) for k, v in data.items()}
    return data


# -- the Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(instructions: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last ``FROM`` stage (what the image runs)."""
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    if not starts:
        raise TopologyError("no FROM in the Dockerfile")
    return list(instructions[starts[-1] :])


def image_paths(instructions: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Files the final stage copies from another stage: image path -> stage path
    (``COPY --from=tokenizer /tokenizers/qwen /opt/...`` -> ``{"/opt/...": "/tokenizers/qwen"}``)."""
    out = {}
    for keyword, rest in final_stage(instructions):
        parts = rest.split()
        if keyword == "COPY" and parts and parts[0].startswith("--from="):
            source, target = parts[-2], parts[-1]
            out[target] = source
    return out


# -- the client's output -------------------------------------------------------------------

_REQUEST = re.compile(
    r"^conversation (?P<conversation>\d+) turn (?P<turn>\d+): engine (?P<engine>\S+) "
    r"status (?P<status>\d+) prompt_tokens (?P<prompt>\d+) cached_tokens (?P<cached>\d+)$"
)


@dataclass(frozen=True)
class Request:
    conversation: int
    turn: int
    engine: str
    status: int
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class ClientRun:
    requests: list[Request]
    verdict: str

    def turn(self, n: int) -> dict[int, Request]:
        return {r.conversation: r for r in self.requests if r.turn == n}


def parse_client_output(text: str) -> ClientRun:
    """The client's stdout: one line per request and the ``OK``/``FAIL`` verdict last."""
    requests = []
    verdict = ""
    for line in text.splitlines():
        if match := _REQUEST.match(line.strip()):
            requests.append(
                Request(
                    int(match["conversation"]),
                    int(match["turn"]),
                    match["engine"],
                    int(match["status"]),
                    int(match["prompt"]),
                    int(match["cached"]),
                )
            )
        elif line.startswith(("OK:", "FAIL:")):
            verdict = line
    return ClientRun(requests, verdict)


def check_client_run(run: ClientRun, conversations: int, engines: Sequence[str]) -> None:
    """What the demo promises, asserted: every request answered by one of ``engines``, every
    follow-up on its first turn's engine with cached tokens."""
    first, second = run.turn(1), run.turn(2)
    assert sorted(first) == sorted(second) == list(range(1, conversations + 1)), run
    assert all(r.status == 200 for r in run.requests), run
    assert {r.engine for r in run.requests} <= set(engines), (run, engines)
    for i, follow_up in second.items():
        assert follow_up.engine == first[i].engine, (i, run)
        assert follow_up.cached_tokens > 0, (i, run)
        assert follow_up.prompt_tokens > first[i].prompt_tokens, (i, run)
    assert run.verdict.startswith("OK:"), run.verdict
