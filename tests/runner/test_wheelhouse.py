"""Packages on demand without network: %pip / !pip install from the operator's wheelhouse only."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from runner.manager import SandboxManager
from tests.runner.helpers import run_ok

WHEEL = "codeloop_demo-1.0-py3-none-any.whl"


def build_wheel(into: Path) -> Path:
    """A minimal pure-Python wheel, written by hand (no build backend, no network)."""
    files = {
        "codeloop_demo/__init__.py": "ANSWER = 42\n",
        "codeloop_demo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: codeloop-demo\nVersion: 1.0\n",
        "codeloop_demo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "codeloop_demo-1.0.dist-info/RECORD,,\n"
    path = into / WHEEL
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in {**files, "codeloop_demo-1.0.dist-info/RECORD": record}.items():
            zf.writestr(name, text)
    return path


@pytest.fixture
def wheelhouse() -> Iterator[Path]:
    # not under pytest's tmp_path (0700): the sandbox's random uid must be able to read it
    path = Path(tempfile.mkdtemp(prefix="codeloop-wheelhouse-"))
    path.chmod(0o755)
    build_wheel(path).chmod(0o644)
    yield path
    shutil.rmtree(path)


async def test_pip_installs_from_the_wheelhouse_only(
    make_manager: Callable[..., Awaitable[SandboxManager]], wheelhouse: Path
) -> None:
    manager = await make_manager(wheelhouse=str(wheelhouse), tmp_size="64m")
    session, _ = await manager.acquire(None, "test")
    result = await run_ok(session, "%pip install codeloop-demo")
    assert "Successfully installed codeloop-demo-1.0" in result.stdout, (result.stdout, result.stderr)
    assert (await run_ok(session, "import codeloop_demo\ncodeloop_demo.ANSWER")).results[0].text == "42"
    # the package went into the session's own site directory, not the image
    where = await run_ok(session, "codeloop_demo.__file__")
    assert where.results[0].text.startswith("'/tmp/.local/lib/python")
    # a package the wheelhouse lacks: one line the model can act on, and pip never tries an index
    missing = await run_ok(session, "!pip install seaborn-extras==1.0 codeloop-demo")
    assert "seaborn-extras is not available in this deployment" in missing.stderr
    assert "available: codeloop-demo." in missing.stderr
    assert "codeloop-demo is not" not in missing.stderr
    assert "http" not in missing.stderr.lower()
    # the wheelhouse is read-only in the sandbox
    ro = await run_ok(session, "import os\nbool(os.statvfs('/opt/wheelhouse').f_flag & os.ST_RDONLY)")
    assert ro.results[0].text == "True"


async def test_without_a_wheelhouse_pip_says_so(session: object) -> None:
    from runner.session import SandboxSession

    assert isinstance(session, SandboxSession)
    result = await run_ok(session, "%pip install polars")
    assert "polars is not available in this deployment" in result.stderr
    assert "available: nothing (no wheelhouse is configured)" in result.stderr
