"""The worker's side of a thread's sandbox: acquired lazily, uploads placed, Stop honoured."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bot.adapters.common import safe_filename
from bot.downloads import Downloader, too_big
from bot.errors import InputRejected, JobCancelled, SessionLost
from bot.jobs import Attachment
from bot.settings import Settings
from bot.store import ConversationState
from runner.results import ErrorInfo, ExecutionResult

if TYPE_CHECKING:
    from runner.engines import Sandboxes
    from runner.session import SandboxSession

log = logging.getLogger(__name__)
__all__ = ["ThreadSandbox", "safe_filename"]


class ThreadSandbox:
    """Implements the agent's ``CodeRunner`` for one job of one conversation."""

    def __init__(self, manager: Sandboxes, state: ConversationState, label: str, settings: Settings,
                 on_new_session: Callable[[], Awaitable[None]] | None = None) -> None:
        self.manager = manager
        #: called when the thread gets a new container, to record its id before any code runs in it
        self.on_new_session = on_new_session
        self.state = state
        self.label = label
        self.settings = settings
        self.session: SandboxSession | None = None
        self.notes: list[str] = []
        self.in_cell = False
        self.cancelled = asyncio.Event()

    async def ensure(self) -> SandboxSession:
        if self.session is None:
            self.session, note = await self.manager.acquire(self.state.session_id, self.label)
            if note:
                self.notes.append(note)
                self.state.files.clear()
            if self.state.session_id != self.session.ref:
                self.state.session_id = self.session.ref  # names its engine when there are several
                if self.on_new_session is not None:
                    await self.on_new_session()
        return self.session

    async def lost(self, session: SandboxSession) -> None:
        """The session failed under us (died, wedged, sent a malformed reply): its container is
        removed now, before the thread's next session is made (acquire() with the old id explains)."""
        self.session = None
        await self.manager.discard(session.ref)

    async def run(self, code: str) -> tuple[ExecutionResult, list[str]]:
        session = await self.ensure()
        notes, self.notes = self.notes, []
        self.in_cell = True
        try:
            result = await session.run(code)
        except SessionLost as exc:
            # Tell the model; the next cell gets a fresh session.
            await self.lost(session)
            result = ExecutionResult(error=ErrorInfo("SessionLost", str(exc), f"SessionLost: {exc}"), restarted=True)
        finally:
            self.in_cell = False
        if self.cancelled.is_set():
            raise JobCancelled()
        return result, notes

    async def stop(self) -> None:
        """Interrupt the running cell (the session stays usable)."""
        self.cancelled.set()
        if self.in_cell and self.session is not None:
            await self.session.interrupt()

    async def upload(self, attachments: list[Attachment]) -> list[str]:
        """Fetch each attachment (``bot.downloads``) and place it in /mnt/data; returns the names used."""
        names = []
        async with Downloader(self.settings) as downloader:
            for att in attachments:
                if att.size > self.settings.max_upload_bytes:
                    raise InputRejected(too_big(att.name, att.size, self.settings.max_upload_bytes))
                data = att.data()
                if data is None:
                    data = await downloader.fetch(att)
                name = safe_filename(att.name)
                session = await self.ensure()
                try:
                    await session.put_file(name, data)
                except SessionLost:
                    await self.lost(session)
                    raise
                if name not in self.state.files:
                    self.state.files.append(name)
                names.append(name)
        return names
