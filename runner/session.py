"""One sandbox session: a container running the executor, reached over its attach stream."""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import time
import uuid
from collections.abc import Callable
from typing import Any

from bot.errors import InputRejected, SandboxError, SessionLost
from runner.attach import AttachStream
from runner.config import SandboxConfig
from runner.results import ErrorInfo, ExecutionResult, FileResult, RichResult

#: how long past the cell's own timeout (plus the interrupt grace) the worker waits for an answer;
#: the executor enforces the timeout, so this only catches a wedged or vanished sandbox
REPLY_SLACK_S = 30.0


def check_name(name: str) -> str:
    """An upload's file name, or InputRejected: one plain name, no path, nothing hidden."""
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or any(ord(c) < 32 for c in name)
        or len(name.encode()) > 255
    ):
        raise InputRejected(f"file name {name!r} is not allowed (use a plain file name, no path)")
    return name


def to_result(raw: dict[str, Any]) -> ExecutionResult:
    """The executor's JSON result as the runner's ExecutionResult (MIME guessed for files)."""
    error = raw.get("error")
    files = []
    for item in raw.get("files", []):
        mime = item.get("mime") or mimetypes.guess_type(item["name"])[0] or "application/octet-stream"
        data = base64.b64decode(item["data"])
        files.append(FileResult(name=item["name"], size=len(data), data=data, mime=mime))
    return ExecutionResult(
        stdout=raw.get("stdout", ""),
        stderr=raw.get("stderr", ""),
        results=[
            RichResult(data=r["data"], kind=r.get("kind", "display_data")) for r in raw.get("results", [])
        ],
        error=ErrorInfo(name=error["name"], value=error["value"], traceback=error["traceback"])
        if error
        else None,
        files=files,
        duration_s=float(raw.get("duration_s", 0.0)),
        timed_out=bool(raw.get("timed_out")),
        oom_killed=bool(raw.get("oom_killed")),
        truncated=bool(raw.get("truncated")),
        restarted=bool(raw.get("restarted")),
        notes=list(raw.get("notes", [])),
    )


class SandboxSession:
    """A live Python session in its own container. ``id`` is the container id (store it)."""

    def __init__(
        self,
        container_id: str,
        config: SandboxConfig,
        on_close: Callable[[SandboxSession], None] | None = None,
    ) -> None:
        self.id = container_id
        self.config = config
        self.created = time.monotonic()
        self._stream: AttachStream | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lock = asyncio.Lock()
        self._on_close = on_close

    @classmethod
    async def attach(
        cls,
        api: Any,
        container_id: str,
        config: SandboxConfig,
        on_close: Callable[[SandboxSession], None] | None = None,
    ) -> SandboxSession:
        session = cls(container_id, config, on_close)
        session._stream = await AttachStream.open(api, container_id, session._dispatch, session._closed)
        return session

    @property
    def closed(self) -> bool:
        return self._stream is None or self._stream.closed

    # --- protocol ---------------------------------------------------------------------------
    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
            return
        # Replies to requests of other attached workers arrive here too; their ids are not ours.
        future = self._pending.pop(str(msg.get("id")), None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _closed(self) -> None:
        lost = SessionLost("the sandbox session ended (its container stopped or was removed)")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(lost)
        self._pending.clear()
        if not self._ready.done():
            self._ready.set_exception(lost)
            self._ready.exception()  # retrieved here so an unawaited failure is not logged
        if self._on_close is not None:
            self._on_close(self)

    async def request(self, op: str, wait_s: float, **fields: Any) -> dict[str, Any]:
        if self._stream is None:
            raise SessionLost("the sandbox session is not attached")
        rid = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self._stream.send({"id": rid, "op": op, **fields})
            reply = await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            raise SessionLost(f"the sandbox did not answer {op!r} within {wait_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise SandboxError(f"sandbox {op} failed: {reply.get('error')}")
        return reply

    async def wait_ready(self, limit_s: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), limit_s)
        except TimeoutError:
            raise SessionLost(f"the sandbox did not start within {limit_s:g} s") from None

    # --- public API -------------------------------------------------------------------------
    async def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run one cell in the session's persistent namespace."""
        limit = self.config.cell_timeout_s if timeout is None else timeout
        wait = limit + self.config.interrupt_grace_s + REPLY_SLACK_S
        async with self._lock:
            reply = await self.request("run", wait, code=code, timeout=limit)
        return to_result(reply["result"])

    async def put_file(self, name: str, data: bytes) -> None:
        """Place an upload at /mnt/data/<name> (a plain name; paths are rejected)."""
        check_name(name)
        async with self._lock:
            await self.request("put", 60.0, name=name, data=base64.b64encode(data).decode())

    async def interrupt(self) -> None:
        """Interrupt the running cell (Stop); a cell ignoring it is killed after the grace period."""
        await self.request("interrupt", 10.0)

    async def reset(self) -> None:
        """A fresh Python namespace (kernel restarted); files in /mnt/data stay."""
        async with self._lock:
            await self.request("reset", 30.0)

    async def ping(self, wait_s: float = 5.0) -> dict[str, Any]:
        return await self.request("ping", wait_s)

    async def detach(self) -> None:
        """Close this worker's connection; the container lives on (another worker may attach)."""
        if self._stream is not None:
            await self._stream.aclose()

    def __repr__(self) -> str:
        return f"SandboxSession({self.id[:12]}, closed={self.closed})"
