"""The wheel's shape: one top-level package ``inference_cache`` and nothing that could
shadow the standard library (a top-level ``operator`` would).

What is real: ``pip wheel`` of this checkout and a fresh venv it is installed into.
What is borrowed: the installed dependencies come from the project venv through a
``.pth`` line, so no network is needed.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("inference_cache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"inference_cache"}
    assert "inference_cache/py.typed" in names
    assert "inference_cache/operator/_doc.py" in names  # the namespace package ships

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Borrow third-party dependencies from the project venv, but not its editable install.
    (Path(purelib) / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)

    for name in ("operator", "index", "render", "extproc", "proto"):
        assert not (Path(purelib) / name).exists(), name
        assert not (Path(purelib) / f"{name}.py").exists(), name

    neutral = tmp_path / "neutral"
    neutral.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import operator, sys, sysconfig; "
        "assert operator.__file__.startswith(sysconfig.get_paths()['stdlib']), operator.__file__; "
        "import inference_cache, inference_cache.index, inference_cache.extproc, "
        "inference_cache.operator, inference_cache.render, inference_cache.proto; "
        "assert inference_cache.__file__.startswith(sys.argv[1]), inference_cache.__file__; "
        "print('ok')"
    )
    out = subprocess.run(
        [str(py), "-c", probe, purelib], cwd=neutral, env=env, check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "ok"
