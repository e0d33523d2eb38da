"""The worker's side of a thread's sandbox: acquired lazily, uploads placed, Stop honoured."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp

from bot.errors import InputRejected, JobCancelled, SessionLost
from bot.jobs import Attachment
from bot.settings import Settings
from bot.store import ConversationState
from runner.results import ErrorInfo, ExecutionResult

if TYPE_CHECKING:
    from runner.manager import SandboxManager
    from runner.session import SandboxSession

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_filename(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_NAME.sub("_", base).strip(" .") or "upload"
    return base[:120]


class ThreadSandbox:
    """Implements the agent's ``CodeRunner`` for one job of one conversation."""

    def __init__(self, manager: SandboxManager, state: ConversationState, label: str, settings: Settings,
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
            if self.state.session_id != self.session.id:
                self.state.session_id = self.session.id
                if self.on_new_session is not None:
                    await self.on_new_session()
        return self.session

    async def lost(self, session: SandboxSession) -> None:
        """The session failed under us (died, wedged, sent a malformed reply): its container is
        removed now, before the thread's next session is made (acquire() with the old id explains)."""
        self.session = None
        await self.manager.discard(session.id)

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

    async def upload(self, attachments: list[Attachment], http: aiohttp.ClientSession) -> list[str]:
        """Fetch each attachment and place it in /mnt/data; returns the names used."""
        names = []
        for att in attachments:
            if att.size > self.settings.max_upload_bytes:
                raise InputRejected(self._too_big(att.name, att.size))
            data = att.data()
            if data is None:
                data = await self._download(att, http)
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

    def _too_big(self, name: str, size: int) -> str:
        return (f"{name} is {size / 1e6:.1f} MB; uploads are limited to "
                f"{self.settings.max_upload_bytes / 1e6:.0f} MB.")

    async def _download(self, att: Attachment, http: aiohttp.ClientSession) -> bytes:
        if not att.url:
            raise InputRejected(f"{att.name}: the upload has neither data nor a URL")
        headers = {}
        if att.auth == "slack" and self.settings.slack_bot_token:
            headers["Authorization"] = f"Bearer {self.settings.slack_bot_token.get_secret_value()}"
        limit = self.settings.max_upload_bytes
        async with http.get(att.url, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as resp:
            if resp.status != 200:
                raise InputRejected(f"{att.name}: could not download the upload (HTTP {resp.status})")
            if resp.content_type == "text/html" and "html" not in att.mime:
                # Slack answers a bad token with its login page and status 200; that is not the user's file.
                raise InputRejected(f"{att.name}: the platform returned a web page instead of the file "
                                    "(is the bot token allowed to read files? scope files:read)")
            chunks, total = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                total += len(chunk)
                if total > limit:
                    raise InputRejected(self._too_big(att.name, total))
                chunks.append(chunk)
        return b"".join(chunks)


