"""Install the peer routers ``bench live`` compares against, each in a venv of its own.

Owner: the live benchmark (``inference_cache.livebench``; ``make peers``, ``make bench``).
Both peers are Rust binaries shipped as PyPI wheels (no torch, no model hub)::

    sglang-router==0.3.2 -> .tools/peers/sglang-router/bin/sglang-router (cache_aware, ...)
    vllm-router==0.1.17  -> .tools/peers/vllm-router/bin/vllm-router (cache_aware, kv_aware, ...)

Usage: ``python hack/peers.py [NAME ...]`` (default: every peer). Idempotent: a venv whose
stamp names the pinned version is kept. Prints ``NAME PATH`` per installed peer on stdout;
a peer that fails to install is reported on stderr and the exit code is 1 (the others are
still installed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / ".tools" / "peers"
STAMP = ".installed"


@dataclass(frozen=True)
class Peer:
    name: str
    """PyPI distribution = venv folder name."""
    version: str
    executable: str
    """Console script inside the venv's ``bin``."""


PEERS = (
    Peer("sglang-router", "0.3.2", "sglang-router"),
    Peer("vllm-router", "0.1.17", "vllm-router"),
)


def executable(peer: Peer, root: Path = ROOT) -> Path:
    return root / peer.name / "bin" / peer.executable


def install(peer: Peer, root: Path = ROOT) -> Path:
    """The peer's executable, installed into ``root/<name>`` unless already there."""
    venv = root / peer.name
    stamp = venv / STAMP
    pin = f"{peer.name}=={peer.version}"
    if stamp.is_file() and stamp.read_text().strip() == pin and executable(peer, root).is_file():
        return executable(peer, root)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
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
