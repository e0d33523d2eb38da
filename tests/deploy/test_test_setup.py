"""The test set-up itself: a hung test fails instead of hanging CI; markers follow the fixtures."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ini() -> dict[str, object]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"])


def test_a_hung_test_fails_with_the_projects_settings(tmp_path: Path) -> None:
    options = ini()
    assert int(str(options["timeout"])) >= 300  # generous: the slowest real test on a busy 2-core VM
    lines = ["[tool.pytest.ini_options]", 'asyncio_mode = "auto"', "timeout = 3",
             f"addopts = {options['addopts']!r}".replace("'", '"')]
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (tmp_path / "test_hang.py").write_text("import asyncio\n\n\nasync def test_hangs():\n"
                                           "    await asyncio.Event().wait()\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Timeout" in out.stdout and "1 failed" in out.stdout, out.stdout


def test_markers_follow_the_fixtures_a_test_uses() -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "not docker", "tests/deploy/test_doctor.py"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_discord_token_shape" in out.stdout
    assert "test_everything_reachable_passes" not in out.stdout  # uses sandbox_image: docker
