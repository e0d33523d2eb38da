"""Helpers shared by the runner tests."""

from __future__ import annotations

import ast
from typing import Any

from runner.results import ExecutionResult
from runner.session import SandboxSession


async def run_ok(session: SandboxSession, code: str, **kw: Any) -> ExecutionResult:
    """Run a cell that must succeed; show its error if it did not. Such a cell gets a generous
    timeout: an import of matplotlib can take seconds on a loaded machine, and the test is about the
    outcome (timeouts are tested with ``session.run`` and the configured limit)."""
    kw.setdefault("timeout", 60.0)
    result = await session.run(code, **kw)
    assert result.error is None, result.error
    return result


def literal(text: str | None) -> object:
    """The value a cell's text/plain shows: IPython pretty-prints (a long dict wraps over lines,
    as in Jupyter), so tests compare values, not layouts."""
    assert text is not None
    return ast.literal_eval(text)
