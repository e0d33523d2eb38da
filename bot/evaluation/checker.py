"""Isolated checks in a small pool of sandbox sessions.

Every check gets a fresh kernel (``reset`` kills every process in the container, so nothing a
previous solution started survives) and empty /tmp and /mnt/data, so no solution can see or
change what another left behind. Sessions are reused because a container start costs ~1 s
while a reset costs milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bot.core.errors import SandboxError
from runner.manager import SandboxManager
from runner.results import ExecutionResult
from runner.session import SandboxSession

log = logging.getLogger(__name__)

T = TypeVar("T")
#: ``run(program, timeout_s)`` in the borrowed session
Runner = Callable[[str, float], Awaitable[ExecutionResult]]

# Runs in the fresh kernel (not the previous one, whose os/shutil a solution could have patched);
# wrapped in a function that deletes itself so the check's namespace starts empty.
WIPE = """def _codeloop_wipe():
    import os, shutil
    for root in ("/tmp", "/mnt/data"):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
_codeloop_wipe()
del _codeloop_wipe
"""


class CheckPool:
    """``size`` sandbox sessions; ``check`` borrows one, makes it fresh, runs the program."""

    def __init__(self, manager: SandboxManager, size: int, timeout_s: float, label: str = "eval") -> None:
        self.manager = manager
        self.size = max(1, size)
        self.timeout_s = timeout_s
        self.label = f"{label}-{secrets.token_hex(4)}"
        self._idle: asyncio.Queue[SandboxSession] = asyncio.Queue()
        self._all: set[str] = set()

    async def start(self) -> None:
        sessions = await asyncio.gather(*(self._new() for _ in range(self.size)), return_exceptions=True)
        failures = [s for s in sessions if isinstance(s, BaseException)]
        for session in sessions:
            if isinstance(session, SandboxSession):
                self._idle.put_nowait(session)
        if failures:
            await self.aclose()
            raise failures[0]

    async def _new(self) -> SandboxSession:
        session, _ = await self.manager.acquire(None, self.label)
        self._all.add(session.id)
        return session

    async def _drop(self, session: SandboxSession) -> None:
        self._all.discard(session.id)
        with contextlib.suppress(Exception):
            await self.manager.destroy(session.id)

    async def _fresh(self, session: SandboxSession) -> None:
        await session.reset()
        wiped = await session.run(WIPE, timeout=30.0)
        if not wiped.ok:
            raise SandboxError(f"could not clean the sandbox before a check: {wiped.error or 'timed out'}")

    async def check_with(self, steps: Callable[[Runner], Awaitable[T]]) -> T:
        """Run ``steps`` against one fresh kernel: it gets ``run(program, timeout_s)``, and its cells
        share the kernel (a reference computed in one cell is there for the next). A lost session
        is replaced and ``steps`` retried once from the start."""
        session = await self._idle.get()
        try:
            try:
                await self._fresh(session)
                return await steps(session.run)
            except SandboxError as exc:  # SessionLost included: the container died or wedged
                log.warning("sandbox %s failed (%s); replacing it", session.id[:12], exc)
                await self._drop(session)
                session = await self._new()
                await self._fresh(session)
                return await steps(session.run)
        finally:
            if session.id in self._all:
                self._idle.put_nowait(session)

    async def check(self, program: str) -> ExecutionResult:
        """Run ``program`` in a fresh namespace, within the pool's timeout."""
        return await self.check_with(lambda run: run(program, self.timeout_s))

    async def aclose(self) -> None:
        """Remove every container this pool created."""
        for session_id in list(self._all):
            self._all.discard(session_id)
            with contextlib.suppress(Exception):
                await self.manager.destroy(session_id)
