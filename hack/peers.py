"""Install the peer routers and the load generator ``bench live`` uses, each in a venv of its own.

Owner: the live benchmark (``inference_cache.livebench``; ``make peers``, ``make bench``).
The peers are Rust binaries shipped as PyPI wheels (no torch, no model hub); inference-perf
(the Inference Extension's load generator, no torch either) needs Python >= 3.12, found by
running the candidates (``python3.12`` on PATH, then ``~/.pyenv/versions/3.12*``)::

    sglang-router==0.3.2   -> .tools/peers/sglang-router/bin/sglang-router (cache_aware, ...)
    vllm-router==0.1.17    -> .tools/peers/vllm-router/bin/vllm-router (cache_aware, kv_aware, ...)
    inference-perf==0.7.0  -> .tools/inference-perf/bin/inference-perf (shared_prefix load)

Usage: ``python hack/peers.py [NAME ...]`` (default: every one). Idempotent: a venv whose
stamp names the pinned version is kept. Prints ``NAME PATH`` per installed tool on stdout;
a tool that fails to install (or has no interpreter) is reported on stderr and the exit code
is 1 (the others are still installed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".tools"
ROOT = TOOLS / "peers"
STAMP = ".installed"


@dataclass(frozen=True)
class Peer:
    name: str
    """PyPI distribution = venv folder name."""
    version: str
    executable: str
    """Console script inside the venv's ``bin``."""
    python: tuple[int, int] | None = None
    """The oldest interpreter the distribution installs on (None: the one running this)."""
    home: Path | None = None
    """The venv's parent folder (None: the ``root`` given, :data:`ROOT` by default)."""


PEERS = (
    Peer("sglang-router", "0.3.2", "sglang-router"),
    Peer("vllm-router", "0.1.17", "vllm-router"),
    Peer("inference-perf", "0.7.0", "inference-perf", python=(3, 12), home=TOOLS),
)


def executable(peer: Peer, root: Path = ROOT) -> Path:
    return (peer.home or root) / peer.name / "bin" / peer.executable


def _candidates(minor: tuple[int, int]) -> Iterable[str]:
    name = f"python{minor[0]}.{minor[1]}"
    if found := shutil.which(name):
        yield found
    for home in sorted(Path.home().glob(f".pyenv/versions/{minor[0]}.{minor[1]}*"), reverse=True):
        yield str(home / "bin" / name)


def find_python(minimum: tuple[int, int]) -> str:
    """The first candidate interpreter that runs and is at least ``minimum`` (a pyenv shim
    with no version selected fails to run and is skipped)."""
    for candidate in _candidates(minimum):
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print(*sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if tuple(int(x) for x in out) >= minimum:
            return candidate
    raise RuntimeError(f"no working python{minimum[0]}.{minimum[1]} (PATH, ~/.pyenv/versions)")


def install(peer: Peer, root: Path = ROOT) -> Path:
    """The peer's executable, installed into ``<home or root>/<name>`` unless already there."""
    venv = (peer.home or root) / peer.name
    stamp = venv / STAMP
    pin = f"{peer.name}=={peer.version}"
    if stamp.is_file() and stamp.read_text().strip() == pin and executable(peer, root).is_file():
        return executable(peer, root)
    python = find_python(peer.python) if peer.python else sys.executable
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", pin], check=True
    )
    if not executable(peer, root).is_file():
        raise RuntimeError(f"{pin} installed no {peer.executable} script")
    stamp.write_text(pin + "\n")
    return executable(peer, root)


def main(argv: list[str]) -> int:
    wanted = set(argv) or {p.name for p in PEERS}
    unknown = wanted - {p.name for p in PEERS}
    if unknown:
        print(f"unknown peers: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    rc = 0
    for peer in PEERS:
        if peer.name not in wanted:
            continue
        try:
            print(peer.name, install(peer), flush=True)
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            print(f"{peer.name}=={peer.version}: not installed: {exc}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
