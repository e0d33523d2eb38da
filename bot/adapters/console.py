"""``codeloop console``: a terminal chat through the same queue and worker as the chat bots.

If no worker is alive it starts one in-process, so this one command is enough. Interactive on a
terminal; with stdin from a pipe it sends one message per line, prints every event as it comes,
and exits after the last message's final event. ``/reset`` starts over, ``/upload PATH``
attaches a file to the next message, ``/export`` writes the thread as a notebook (nbformat v4),
Ctrl-C stops a running answer (twice quits).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import mimetypes
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

from bot.core.errors import InputRejected
from bot.core.jobs import Attachment, Conversation, Event, Job
from bot.core.notebook import NotebookRecorder, dumps
from bot.core.settings import Settings
from bot.ops import metrics
from bot.queue import redis_conn
from bot.queue.blobs import BlobStore, inline_bytes, missing_note
from bot.queue.stream import JobQueue
from bot.worker.sandbox_link import safe_filename
from bot.worker.service import Worker, any_worker_alive

log = logging.getLogger(__name__)


class ConsoleRenderer:
    """Prints events; saves images and files under ``out_dir``."""

    def __init__(self, out_dir: Path, interactive: bool) -> None:
        self.out_dir = out_dir
        self.interactive = interactive
        self.in_delta = False

    def _line(self, text: str) -> None:
        if self.in_delta:
            print()
            self.in_delta = False
        print(text, flush=True)

    def render(self, event: Event, data: bytes | None = None) -> None:
        """``data``: the bytes of an image/file event (taken from its blob by the caller)."""
        p = event.payload
        if event.type == "delta":
            if not self.in_delta:
                print("assistant> " if self.interactive else "[reply] ", end="")
                self.in_delta = True
            print(p.get("text", ""), end="", flush=True)
        elif event.type == "status":
            self._line(f"[status] {p.get('text', '')}")
        elif event.type == "code":
            self._line(f"[code round {p.get('round', 0) + 1}] (runs in the sandbox)")
        elif event.type == "output":
            text = p.get("text") or "(no output)"
            self._line("[output]\n" + text)
        elif event.type in ("image", "file"):
            if data is None:
                data = inline_bytes(p)
            if data is None:
                self._line(f"[{event.type}] {missing_note(p)}")
                return
            try:
                path = self._save(event.conversation.thread, str(p.get("name", event.type)), data)
            except (InputRejected, OSError, ValueError) as exc:
                self._line(f"[{event.type}] not saved: {exc}")
            else:
                self._line(f"[{event.type}] saved {path}")
        elif event.type == "final":
            tag = "stopped" if p.get("cancelled") else f"done in {p.get('rounds', 0)} round(s)"
            self._line(f"[final] {tag}")
        elif event.type == "error":
            self._line(f"[error] {p.get('message', '')}")

    def _save(self, thread: str, name: str, data: bytes) -> Path:
        """Write under ``out_dir/<thread>/`` only: names come from the sandbox, so each is reduced to
        a plain basename, checked to stay in the folder, and opened without following a link."""
        folder = (self.out_dir / safe_filename(thread)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / safe_filename(name)
        if path.parent != folder:
            raise InputRejected(f"refused to save {name!r} outside {folder}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path


class Console:
    def __init__(self, settings: Settings, thread: str | None, out_dir: Path, interactive: bool) -> None:
        self.settings = settings
        self.redis = redis_conn.connect(settings)
        self.queue = JobQueue(self.redis, settings)
        self.conversation = Conversation(platform="console", workspace=socket.gethostname(), channel="terminal",
                                         thread=thread or uuid.uuid4().hex[:12])
        self.reply_stream = settings.key("replies", "console", uuid.uuid4().hex)
        self.renderer = ConsoleRenderer(out_dir, interactive)
        self.out_dir = out_dir
        self.notebook = NotebookRecorder(title=self.conversation.thread)
        self.blobs = BlobStore(self.redis, settings)
        self.interactive = interactive
        self.pending_files: list[Attachment] = []
        self.last_id = "0"

    async def connect(self) -> None:
        await redis_conn.check(self.redis, self.settings)

    async def send(self, text: str, kind: str = "message") -> None:
        job = Job(idempotency_key=uuid.uuid4().hex, conversation=self.conversation, user="console",
                  text=text, kind=kind, reply_stream=self.reply_stream,  # type: ignore[arg-type]
                  attachments=self.pending_files)
        self.pending_files = []
        if kind == "message":
            self.notebook.user(text)
        await self.queue.enqueue(job)
        await self._follow(job.id)

    async def _follow(self, job_id: str) -> None:
        """Render the job's events up to its terminal one. Each entry read is deleted from the
        console's stream (and each file from its blob), so a long session keeps nothing in Redis."""
        while True:
            resp = await self.redis.xread({self.reply_stream: self.last_id}, block=1000, count=100)
            seen: list[bytes] = []
            try:
                for _, entries in resp or []:
                    for entry_id, fields in entries:
                        self.last_id = entry_id
                        seen.append(entry_id)
                        event = Event.loads(fields[b"event"])
                        if event.job_id != job_id:
                            continue
                        data = None
                        if event.type in ("image", "file"):
                            data = await self.blobs.payload_bytes(event.payload)
                        self.renderer.render(event, data)
                        self.notebook.event(event, data)
                        if event.terminal:
                            return
            finally:
                if seen:
                    await self.redis.xdel(self.reply_stream, *seen)

    def attach(self, path_text: str) -> str:
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise InputRejected(f"no such file: {path}")
        size = path.stat().st_size
        if size > self.settings.max_upload_bytes:
            raise InputRejected(f"{path.name} is {size / 1e6:.1f} MB; the upload limit is "
                                f"{self.settings.max_upload_bytes / 1e6:.0f} MB")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.pending_files.append(Attachment(name=path.name, size=size, mime=mime,
                                             data_b64=base64.b64encode(path.read_bytes()).decode()))
        return f"attached {path.name} ({size:,} bytes) to your next message"

    def export(self) -> Path:
        """This session's part of the thread as ``<out>/<thread>/<thread>.ipynb`` (nbformat v4)."""
        folder = self.out_dir / safe_filename(self.conversation.thread)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{safe_filename(self.conversation.thread)}.ipynb"
        path.write_text(dumps(self.notebook.notebook()), encoding="utf-8")
        return path

    async def handle_line(self, line: str) -> bool:
        """Returns False when the user asked to quit."""
        text = line.strip()
        if text in ("/quit", "/exit"):
            return False
        if text == "/reset":
            await self.send("", kind="reset")
        elif text == "/export":
            print(f"[export] wrote {self.export()}", flush=True)
        elif text.startswith("/upload "):
            try:
                print(self.attach(text[len("/upload "):].strip()), flush=True)
            except InputRejected as exc:
                print(f"[error] {exc}", flush=True)
        elif text or self.pending_files:
            task = asyncio.create_task(self.send(text))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                # Ctrl-C: ask the worker to stop, then wait for its final event
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                await self.queue.cancel(self.conversation)
                await task
        return True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.delete(self.reply_stream)
        await self.redis.aclose()


async def _read_line(prompt: str) -> str | None:
    """input() on a daemon thread: a blocked read must not keep the process alive at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def read() -> None:
        try:
            line: str | None = input(prompt)
        except (EOFError, OSError):
            line = None
        def deliver() -> None:
            if not future.done():
                future.set_result(line)

        loop.call_soon_threadsafe(deliver)

    threading.Thread(target=read, daemon=True).start()
    return await future


async def run_console(settings: Settings, args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty() and not args.batch
    console = Console(settings, args.thread, Path(args.out), interactive)
    await console.connect()
    worker: Worker | None = None
    worker_task: asyncio.Task[None] | None = None
    if args.worker == "always" or (args.worker == "auto" and not await any_worker_alive(console.redis, settings)):
        if interactive:
            print(f"[status] starting an in-process worker (model backend: {settings.backend})", flush=True)
        worker = Worker(settings)
        worker_task = asyncio.create_task(worker.run())
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({worker_task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if worker_task.done():
            ready.cancel()
            worker_task.result()  # raises the start-up error (bad image, unreachable model, ...)
    try:
        if interactive:
            print(f"codeloop console: thread {console.conversation.thread}. /upload PATH, /export, /reset, /quit.")
        while True:
            line = await _read_line("you> " if interactive else "")
            if line is None or not await console.handle_line(line):
                break
    finally:
        await console.close()
        if worker is not None and worker_task is not None:
            worker.stop()
            await worker_task
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thread", help="resume (or name) a conversation thread")
    parser.add_argument("--out", default="codeloop-out", help="folder for images and files (default %(default)s)")
    parser.add_argument("--worker", choices=("auto", "always", "never"), default="auto",
                        help="start an in-process worker: auto = when none is running (default)")
    parser.add_argument("--batch", action="store_true", help="line-per-message mode even on a terminal")


def main(args: argparse.Namespace) -> int:
    settings = Settings.load()
    metrics.setup_logging(settings)
    if sys.stdin.isatty():
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    return asyncio.run(run_console(settings, args))
