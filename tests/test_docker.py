"""The Docker image: its Dockerfile lints clean, the package it installs carries every file
the server needs, and, where docker or buildah is present, the image builds, starts, is
healthy and trains a run (scripts/check_docker.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_docker.sh"


def _engine() -> str | None:
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
        if ok:
            return "docker"
    return "buildah" if shutil.which("buildah") else None


def test_dockerfile_lints_clean():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", str(CHECK), "--lint-only"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_installed_package_carries_its_data_files(tmp_path):
    """What the image installs (a wheel built from what the Dockerfile copies, not this
    checkout): kernel source, migrations and the dashboard's assets must be in it."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md", "bncore", "bnscope", "server", "dashboard"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, context / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=context,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("bnscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "bncore/nn/kernels/bn_cpu.cpp",
        "bncore/nn/kernels/record_cpu.cpp",
        "bncore/nn/kernels/bn_cpu.h",
        "server/migrations/env.py",
        "server/migrations/versions/0003_pending.py",
        "dashboard/assets/live.js",
        "dashboard/assets/style.css",
    ):
        assert needed in names, f"{needed} missing from the wheel"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(_engine() is None, reason="neither a Docker engine nor buildah here")
def test_the_image_builds_starts_and_trains_a_run():
    r = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=1700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "completed inside the image" in r.stderr


def test_the_image_installs_the_postgresql_driver(tmp_path):
    """The requirements the Dockerfile writes (its own command, run on pyproject.toml) hold the
    postgres extra: ``--database-url postgresql+psycopg://...`` works in the image as is."""
    line = next(
        ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if "import tomllib" in ln
    )
    code = line.split('python3 -c "', 1)[1].split('" >', 1)[0]
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert any(req.startswith("psycopg[binary]") for req in out), out
    assert "fastapi-offline>=1.7,<2" in out  # and the dependencies, as before
