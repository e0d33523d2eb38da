"""scripts/bootstrap's trip-wires on a fresh machine, run for real with stand-in commands on PATH.

``source scripts/bootstrap`` defines its functions without running it, so each decision is tested
on its own; the Python check is tested through the whole script, which must stop before it
installs anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap"


def stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def run(code: str, path: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={"PATH": path, "HOME": str(cwd), **env})


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_an_old_python_stops_it_before_anything_is_installed(tmp_path: Path, version: str) -> None:
    stub(tmp_path, "python3", f"echo {version}")
    marker = tmp_path / "installed"
    for tool in ("apt-get", "sudo", "pip"):
        stub(tmp_path, tool, f"touch {marker}")
    out = run(f"bash {BOOTSTRAP}", f"{tmp_path}:/usr/bin:/bin")
    assert out.returncode == 1
    assert f"Python {version} is too old: codeloop needs 3.11 or newer" in out.stderr
    assert not marker.exists()


def test_this_python_passes_the_check(tmp_path: Path) -> None:
    real = Path(sys.executable).resolve().parent
    out = run(f"source {BOOTSTRAP}; check_python && echo fine", f"{real}:/usr/bin:/bin")
    assert out.stdout.strip() == "fine", out.stderr


def test_without_a_gpu_torch_is_the_cpu_build_with_a_default_index_fallback(tmp_path: Path) -> None:
    stub(tmp_path, "nvidia-smi", "exit 9")  # installed, but no driver or no GPU
    for path in ("/usr/bin:/bin", f"{tmp_path}:/usr/bin:/bin"):
        out = run(f"source {BOOTSTRAP}; torch_plan", path, TORCH_VERSION="2.13.0")
        assert out.stdout.splitlines() == [
            "torch==2.13.0+cpu",  # the default index may serve the CPU build itself (this CI's does)
            "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0",
            "torch==2.13.0",  # a host that reaches only the default index still installs
        ], out.stderr


def test_with_an_nvidia_gpu_torch_is_the_cuda_build(tmp_path: Path) -> None:
    stub(tmp_path, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"')
    out = run(f"source {BOOTSTRAP}; torch_plan", f"{tmp_path}:/usr/bin:/bin", TORCH_VERSION="2.13.0")
    assert out.stdout.splitlines() == ["torch==2.13.0"], out.stderr


def test_a_half_made_venv_is_not_taken_for_a_ready_one(tmp_path: Path) -> None:
    """python3 -m venv without python3-venv leaves .venv/bin/python and no pip; a rerun must redo it."""
    python = Path(sys.executable).resolve().parent
    path = f"{python}:/usr/bin:/bin"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True,
                   env={**os.environ, "PATH": path})
    out = run(f"source {BOOTSTRAP}; venv_ready && echo ready || echo redo", path, cwd=tmp_path)
    assert out.stdout.strip() == "redo", out.stderr
    subprocess.run([str(tmp_path / ".venv/bin/python"), "-m", "ensurepip"], capture_output=True, check=True,
                   timeout=300)
    out = run(f"source {BOOTSTRAP}; venv_ready && echo ready || echo redo", path, cwd=tmp_path)
    assert out.stdout.strip() == "ready", out.stderr
