"""The worker's side of a thread's sandbox: acquired lazily, uploads placed, Stop honoured."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bot.core.errors import InputRejected, JobCancelled, SessionLost
from bot.core.jobs import Attachment
from bot.core.limits import safe_filename
from bot.core.settings import Settings
from bot.worker.downloads import Downloader, too_big
from bot.worker.files_store import FilesStore, ThreadFiles
from bot.worker.store import ConversationState
from runner.results import ErrorInfo, ExecutionResult, FileResult

if TYPE_CHECKING:
    from runner.engines import Sandboxes
    from runner.session import SandboxSession

log = logging.getLogger(__name__)
__all__ = ["ThreadSandbox", "safe_filename"]

RESTORED = "Python variables were reset, but your files in /mnt/data were restored"
#: the executor's note when a cell's files were over the return caps (runner/sandbox/files.py)
NOT_RETURNED = "were not returned"


def _full_output(result: ExecutionResult, item: FileResult) -> bool:
    """stdout.txt / stderr.txt that carry a cut output in full: not a file of /mnt/data."""
    return (result.truncated and item.name in ("stdout.txt", "stderr.txt")
            and any(f"attached in full as {item.name}" in note for note in result.notes))


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
        self.store = FilesStore.from_settings(settings)
        #: the worker's copy of this thread's /mnt/data (bot/worker/files_store.py)
        self.files: ThreadFiles = self.store.thread(label)
        self._touched = False

    async def ensure(self) -> SandboxSession:
        if self.session is None:
            await self.begin()
            previous = self.state.session_id
            session, note = await self.manager.acquire(previous, self.label)
            if previous not in (session.id, session.ref):
                # a fresh session: put the thread's files back before anything else runs in it
                restored = await self._restore(session)
                if note or restored:
                    self.notes.append(self._note(note, restored))
            self.session = session
            if self.state.session_id != session.ref:
                self.state.session_id = session.ref  # names its engine when there are several
                if self.on_new_session is not None:
                    await self.on_new_session()
        return self.session

    async def begin(self) -> None:
        """Once per job: a new conversation starts with no stored files (one that expired in Redis
        may have left some), an ongoing one's expiry starts again; expired threads are swept."""
        if self._touched:
            return
        self._touched = True
        fresh = self.state.session_id is None and not self.state.history and self.state.jobs == 0
        await asyncio.to_thread(self.files.remove if fresh else self.files.touch)
        await asyncio.to_thread(self.store.maybe_sweep)

    async def _restore(self, session: SandboxSession) -> tuple[list[str], list[str], bool] | None:
        """Put the stored files into a fresh ``session``; (restored, not restored, unreturned)."""
        plain, skipped, unreturned = await asyncio.to_thread(self.files.restore_plan)
        if not plain and not skipped and not unreturned:
            return None
        restored = []
        for name in plain:
            data = await asyncio.to_thread(self.files.read, name)
            if data is None:
                skipped.append(name)
                continue
            try:
                await session.put_file(name, data)
            except InputRejected:
                skipped.append(name)
                continue
            except SessionLost:
                await self.lost(session)
                raise
            restored.append(name)
        self.state.files[:] = [n for n in self.state.files if n in restored]
        return restored, skipped, unreturned

    @staticmethod
    def _note(why: str | None, restored: tuple[list[str], list[str], bool] | None) -> str:
        lead = (why or "This thread has a new Python session.").rstrip()
        if restored is None:
            return f"{lead} Python variables were reset; /mnt/data starts empty."
        names, skipped, unreturned = restored
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        text = f"{lead} {RESTORED} ({shown})." if names else f"{lead} Python variables were reset."
        if skipped:
            text += (" Not restored (in a subfolder, or over this thread's file cap): "
                     + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "") + ".")
        if unreturned:
            text += (" Files a cell wrote that were not returned (over the per-cell return caps) could not be "
                     "restored.")
        return text

    async def keep(self, result: ExecutionResult) -> None:
        """Copy the files a cell returned into the thread's store; notes (evictions) go to the result."""
        for item in result.files:
            if _full_output(result, item):
                continue
            try:
                result.notes.extend(await asyncio.to_thread(self.files.save, item.name, item.data))
            except (OSError, ValueError) as exc:
                log.warning("could not keep %s of %s: %s", item.name, self.label, exc)
        if any(NOT_RETURNED in note for note in result.notes):
            await asyncio.to_thread(self.files.mark_unreturned)

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
        await self.keep(result)
        if self.cancelled.is_set():
            raise JobCancelled()
        return result, notes

    async def stop(self) -> None:
        """Interrupt the running cell (the session stays usable)."""
        self.cancelled.set()
        if self.in_cell and self.session is not None:
            await self.session.interrupt()

    async def upload(self, attachments: list[Attachment]) -> list[str]:
        """Fetch each attachment (``bot.worker.downloads``) and place it in /mnt/data; returns the names used."""
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
                try:
                    self.notes.extend(await asyncio.to_thread(self.files.save, name, data))
                except (OSError, ValueError) as exc:
                    log.warning("could not keep the upload %s of %s: %s", name, self.label, exc)
                if name not in self.state.files:
                    self.state.files.append(name)
                names.append(name)
        return names
