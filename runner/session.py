"""One sandbox session: a container running the executor, reached over its attach stream.

The host never trusts a session: every line is bounded (runner/attach.py) and every result checked
(runner/results.py). A session that breaks the protocol, sends a malformed result or stops answering
is *lost*: its container is removed (``lose``) before the error reaches the caller, so a thread's
next session is never made while the old one still runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from docker.errors import APIError, DockerException, NotFound

from bot.core.errors import InputRejected, MalformedReply, SandboxError, SessionLost
from runner.attach import AttachStream
from runner.config import SandboxConfig
from runner.results import ExecutionResult, ReplyLimits, parse_result, safe_repr

log = logging.getLogger(__name__)

#: how long past the cell's own timeout (plus the interrupt grace) the worker waits for an answer;
#: the executor enforces the timeout, so this only catches a wedged or vanished sandbox
REPLY_SLACK_S = 30.0
#: what the model and the user are told; the detail goes to the log
MALFORMED = "the sandbox session sent a malformed reply and was replaced"


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


async def remove_container(api: Any, container_id: str) -> bool:
    """Force-remove a container (SIGKILL, frozen or paused included); True once it is gone.
    Idempotent: a container already gone, or being removed by the engine, counts as gone."""
    try:
        await asyncio.to_thread(api.remove_container, container_id, force=True)
    except NotFound:
        pass
    except APIError as exc:
        if exc.status_code != 409:  # 409: auto-remove (or another janitor) is already removing it
            log.warning("could not remove sandbox %s: %s", container_id[:12], exc)
            return False
    except (DockerException, OSError) as exc:
        log.warning("could not remove sandbox %s: %s", container_id[:12], exc)
        return False
    return True


class SandboxSession:
    """A live Python session in its own container. ``id`` is the container id; a thread stores ``ref``."""

    def __init__(
        self,
        container_id: str,
        config: SandboxConfig,
        on_close: Callable[[SandboxSession], None] | None = None,
        api: Any = None,
        on_use: Callable[[SandboxSession], None] | None = None,
    ) -> None:
        self.id = container_id
        #: what a thread records: the container id, or "<engine>/<container id>" when several
        #: engines serve sandboxes (runner/engines.py)
        self.ref = container_id
        self.config = config
        self.limits = ReplyLimits.from_config(config)
        self.created = time.monotonic()
        #: wall-clock time of the last request or reply other than a ping (the host's idle record)
        self.last_used = time.time()
        #: why the host declared the session lost (its container is then removed), else None
        self.lost: str | None = None
        self._api = api
        self._stream: AttachStream | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lock = asyncio.Lock()
        self._on_close = on_close
        self._on_use = on_use
        self._removal: asyncio.Task[bool] | None = None

    @classmethod
    async def attach(
        cls,
        api: Any,
        container_id: str,
        config: SandboxConfig,
        on_close: Callable[[SandboxSession], None] | None = None,
        on_use: Callable[[SandboxSession], None] | None = None,
    ) -> SandboxSession:
        session = cls(container_id, config, on_close, api, on_use)
        session._stream = await AttachStream.open(
            api, container_id, session._dispatch, session._closed, session.limits.max_line
        )
        return session

    @property
    def closed(self) -> bool:
        return self._stream is None or self._stream.closed

    @property
    def busy(self) -> bool:
        """A request of this process is waiting for its answer."""
        return bool(self._pending)

    # --- protocol ---------------------------------------------------------------------------
    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
            return
        # Replies to requests of other attached workers arrive here too; their ids are not ours.
        rid = msg.get("id")
        future = self._pending.pop(rid, None) if isinstance(rid, str) else None
        if future is not None and not future.done():
            future.set_result(msg)

    def _closed(self) -> None:
        violation = self._stream.violation if self._stream is not None else None
        lost: SessionLost
        if violation is not None:
            self._declare_lost(f"protocol violation: {violation}")
            lost = MalformedReply(MALFORMED)
        else:
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

    def _declare_lost(self, reason: str) -> None:
        """Note why (once, in the log) and start removing the container."""
        if self.lost is None:
            self.lost = reason
            log.warning("sandbox %s lost: %s; removing its container", self.id[:12], reason)
        failed = self._removal is not None and self._removal.done() and not self._removal.result()
        if (self._removal is None or failed) and self._api is not None:
            self._removal = asyncio.get_running_loop().create_task(remove_container(self._api, self.id))

    async def lose(self, reason: str) -> bool:
        """Declare the session lost: stop reading it and remove its container. Idempotent; True once
        the container is gone (a failed removal is logged and tried again by the next call)."""
        self._declare_lost(reason)
        if self._stream is not None:
            await self._stream.aclose()
        return await asyncio.shield(self._removal) if self._removal is not None else False

    def _used(self) -> None:
        self.last_used = time.time()
        if self._on_use is not None:
            self._on_use(self)

    async def _exchange(self, op: str, wait_s: float, fields: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its reply (TimeoutError when none comes in ``wait_s``)."""
        if self._stream is None:
            raise SessionLost("the sandbox session is not attached")
        rid = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self._stream.send({"id": rid, "op": op, **fields})
            return await asyncio.wait_for(future, wait_s)
        finally:
            self._pending.pop(rid, None)

    async def request(self, op: str, wait_s: float, **fields: Any) -> dict[str, Any]:
        if op != "ping":
            self._used()
        try:
            reply = await self._exchange(op, wait_s, fields)
        except SessionLost:
            if self.lost is not None:  # cut for a protocol violation: gone before the caller hears it
                await self.lose(self.lost)
            raise
        except TimeoutError:
            # Wedged or frozen: nothing it says later can be trusted to belong to this request.
            await self.lose(f"no answer to {op!r} within {wait_s:g} s")
            raise SessionLost(f"the sandbox did not answer {op!r} within {wait_s:g} s and was removed") from None
        if op != "ping":
            self._used()
        if reply.get("ok") is not True:
            raise SandboxError(f"sandbox {op} failed: {safe_repr(str(reply.get('error')), 300)}")
        return reply

    async def probe(self, wait_s: float) -> bool:
        """True when the executor answers a ping in time. Unlike ``ping`` a silence changes nothing:
        the janitor removes a container only after several in a row (runner/janitor.py)."""
        try:
            reply = await self._exchange("ping", wait_s, {})
        except (TimeoutError, SessionLost):
            return False
        return reply.get("ok") is True

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
        try:
            return parse_result(reply.get("result"), self.limits)
        except MalformedReply as exc:
            await self.lose(f"a malformed result: {exc}")
            raise MalformedReply(MALFORMED) from None

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
        """The executor's status; an executor that does not answer in time is lost (and removed)."""
        return await self.request("ping", wait_s)

    async def detach(self) -> None:
        """Close this worker's connection; the container lives on (another worker may attach)."""
        if self._stream is not None:
            await self._stream.aclose()

    def __repr__(self) -> str:
        return f"SandboxSession({self.id[:12]}, closed={self.closed})"
