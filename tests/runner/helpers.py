"""Helpers shared by the runner tests."""

from __future__ import annotations

from typing import Any

from runner.results import ExecutionResult
from runner.session import SandboxSession


async def run_ok(session: SandboxSession, code: str, **kw: Any) -> ExecutionResult:
    """Run a cell that must succeed; show its error if it did not."""
    result = await session.run(code, **kw)
    assert result.error is None, result.error
    return result
