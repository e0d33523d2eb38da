"""SandboxManager: creates, pools, reattaches and removes the per-thread sandbox containers.

Docker API calls (create, start, inspect, rename, remove) go through the docker SDK in a thread;
the per-cell traffic goes over the attach stream (runner/attach.py) and never blocks the loop.
A session this process finds lost (runner/session.py) is removed before the thread gets another,
and with ``reap`` set a janitor (runner/janitor.py) removes what no executor ends by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from bot.core.errors import SandboxError, SandboxUnavailable, SessionLost
from runner.config import POOL_LABEL, PROTOCOL, SESSION_LABEL, SandboxConfig, container_spec
from runner.janitor import IdleRecord, Janitor, ReapPolicy, stamped_name
from runner.session import SandboxSession, remove_container

log = logging.getLogger(__name__)
BUILD_HINT = "run `codeloop sandbox build`"


def _span(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:g} minutes"
    return f"{seconds:g} seconds"


class SandboxManager:
    def __init__(
        self,
        config: SandboxConfig,
        docker_client: docker.DockerClient | None = None,
        reap: ReapPolicy | None = None,
    ) -> None:
        """``reap``: run a janitor with this policy from ``start()`` (every worker does); without
        it, its ping timeout still bounds how long ``acquire`` waits for a thread's old executor."""
        self.config = config
        self.reap = reap or ReapPolicy()
        self.janitor = Janitor(self, self.reap) if reap is not None else None
        self._client = docker_client
        self._pool: list[SandboxSession] = []
        self._sessions: dict[str, SandboxSession] = {}  # attached from this process
        self._crashed: set[str] = set()  # sessions seen ending without destroy()
        #: declared lost here (no answer, malformed): removed before the thread gets another session;
        #: the janitor retries a removal that failed
        self.lost: set[str] = set()
        self.idle = IdleRecord(self)
        self._closing: set[str] = set()
        self._refill = asyncio.Event()
        self._pool_full = asyncio.Event()
        self._refill_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._janitor_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env()
            except DockerException as exc:
                raise SandboxUnavailable(
                    f"Docker engine unreachable ({exc}); start dockerd or set DOCKER_HOST"
                ) from exc
        return self._client

    @property
    def pool_ready(self) -> int:
        """Warm sandboxes waiting for a thread."""
        return sum(1 for session in self._pool if not session.closed)

    async def wait_pool(self) -> None:
        """Until the warm pool is full (benchmarks and tests measure the warm path with it)."""
        if self.config.pool_size > 0:
            await self._pool_full.wait()

    @property
    def api(self) -> Any:
        return self.client.api

    async def start(self) -> None:
        """Check the engine and the image, then keep the warm pool filled in the background."""
        try:
            await asyncio.to_thread(self.client.ping)
        except (DockerException, OSError) as exc:
            raise SandboxUnavailable(
                f"Docker engine unreachable ({exc}); start dockerd or set DOCKER_HOST"
            ) from exc
        try:
            image = await asyncio.to_thread(self.api.inspect_image, self.config.image)
        except ImageNotFound:
            raise SandboxUnavailable(f"sandbox image {self.config.image} not found: {BUILD_HINT}") from None
        except (DockerException, OSError) as exc:
            raise SandboxUnavailable(f"cannot inspect sandbox image {self.config.image} ({exc})") from exc
        labels = (image.get("Config") or {}).get("Labels") or {}
        if labels.get("codeloop.sandbox.protocol") != PROTOCOL:
            raise SandboxUnavailable(
                f"sandbox image {self.config.image} was built for another codeloop version: {BUILD_HINT}"
            )
        if self.config.pool_size > 0 and self._refill_task is None:
            self._refill_task = asyncio.create_task(self._refill_loop())
            self._keepalive_task = asyncio.create_task(self._keepalive_loop())
        if self.janitor is not None and self._janitor_task is None:
            self._janitor_task = asyncio.create_task(self.janitor.run())

    # --- containers -------------------------------------------------------------------------
    async def _create(self, label: str, claim_ttl_s: float = 0.0) -> SandboxSession:
        spec = container_spec(self.api, self.config, label, claim_ttl_s)
        taken = label != POOL_LABEL
        now = time.time()
        try:
            created = await asyncio.to_thread(
                self.api.create_container_from_config, spec, stamped_name(label, now if taken else None)
            )
        except ImageNotFound:
            raise SandboxUnavailable(f"sandbox image {self.config.image} not found: {BUILD_HINT}") from None
        except (DockerException, OSError) as exc:
            raise SandboxUnavailable(f"cannot create a sandbox container ({exc})") from exc
        cid: str = created["Id"]
        try:
            # Attach before start: the executor's "ready" line is sent once, at start.
            session = await SandboxSession.attach(self.api, cid, self.config, self._on_session_end, self.idle.touch)
            await asyncio.to_thread(self.api.start, cid)
            await session.wait_ready(self.config.start_timeout_s)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.api.remove_container, cid, force=True)
            raise
        if taken:
            self.idle.created(cid, label, now)
        return session

    def _on_session_end(self, session: SandboxSession) -> None:
        if session.lost is not None:
            self.lost.add(session.id)
        if session.id in self._closing:
            return
        if self._sessions.pop(session.id, None) is not None:
            self._crashed.add(session.id)
        if session in self._pool:
            self._pool.remove(session)
            self._pool_full.clear()
            self._refill.set()

    async def _refill_loop(self) -> None:
        backoff = 0.5
        while True:
            while len(self._pool) < self.config.pool_size:
                try:
                    self._pool.append(await self._create(POOL_LABEL, self.config.pool_claim_ttl_s))
                    backoff = 0.5
                except (SandboxUnavailable, SessionLost) as exc:
                    log.warning("sandbox pool refill failed: %s (retrying in %.1f s)", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
            self._pool_full.set()
            self._refill.clear()
            await self._refill.wait()

    async def _keepalive_loop(self) -> None:
        """Ping the warm pool: its containers exit after ``pool_claim_ttl_s`` without a ping, so a
        worker killed with its pool (kill -9, OOM, a lost host) leaves no container for long."""
        period = max(0.2, self.config.pool_claim_ttl_s / 3)
        while True:
            await asyncio.sleep(period)
            for session in list(self._pool):
                with contextlib.suppress(SandboxError):
                    # a silent one is removed and leaves the pool through _on_session_end
                    await session.ping(self.reap.ping_timeout_s)

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background (awaited by ``aclose``)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _take(self, session: SandboxSession, label: str) -> None:
        self._sessions[session.id] = session
        self.idle.take(session, label)

    def session(self, container_id: str) -> SandboxSession | None:
        """The live session this process holds for a container (a thread's or a warm one)."""
        found = self._sessions.get(container_id)
        if found is None:
            found = next((s for s in self._pool if s.id == container_id), None)
        return found if found is not None and not found.closed else None

    async def remove(self, container_id: str, reason: str) -> bool:
        """Remove a container the host no longer trusts (lost, idle, unresponsive); idempotent."""
        session = self._sessions.get(container_id) or next((s for s in self._pool if s.id == container_id), None)
        if session is not None:
            gone = await session.lose(reason)
        else:
            log.warning("sandbox %s: %s; removing it", container_id[:12], reason)
            gone = await remove_container(self.api, container_id)
        if gone:
            self.lost.discard(container_id)
        else:
            self.lost.add(container_id)
        return gone

    def forget_lost(self, listed: set[str]) -> None:
        """Lost containers the engine no longer lists are gone: stop tracking them."""
        self.lost &= listed
        self.idle.prune(listed | set(self._sessions))

    # --- public API -------------------------------------------------------------------------
    async def acquire(self, session_id: str | None, label: str) -> tuple[SandboxSession, str | None]:
        """The thread's session: reattached if its executor answers, else a fresh one (with a note
        why; the worker adds what became of the thread's variables and files, bot/worker/sandbox_link.py). A
        previous session that is lost, frozen or wedged is removed before the new one is made."""
        note = None
        if session_id:
            session, note = await self.resume(session_id, label)
            if session is not None:
                return session, None
        return await self.fresh(label), note

    async def resume(self, session_id: str, label: str) -> tuple[SandboxSession | None, str | None]:
        """The thread's session if its executor answers, else None and a note why it is gone (the
        old container removed first). runner/engines.py places the fresh one on any engine."""
        session = await self._reattach(session_id, label)
        if session is not None:
            return session, None
        if session_id in self._crashed:
            return None, "The previous Python session stopped unexpectedly."
        return None, f"The previous Python session expired after {_span(self.config.idle_ttl_s)} idle."

    async def fresh(self, label: str) -> SandboxSession:
        """A new session for a thread: a warm one from the pool, else one created now."""
        while self._pool:
            session = self._pool.pop(0)
            self._pool_full.clear()
            self._refill.set()
            if not session.closed:
                self._take(session, label)
                return session
        session = await self._create(label)
        self._sessions[session.id] = session
        return session

    async def _reattach(self, session_id: str, label: str) -> SandboxSession | None:
        if session_id in self.lost:
            await self._gone(session_id, "declared lost")
            return None
        wait = self.reap.ping_timeout_s
        local = self._sessions.get(session_id)
        if local is not None and not local.closed:
            try:
                await local.ping(wait)  # a silence removes it (SandboxSession.request)
            except SandboxError:
                await self._gone(session_id, "no answer to a ping")
                return None
            return local
        try:
            info = await asyncio.to_thread(self.api.inspect_container, session_id)
        except NotFound:
            return None
        except (DockerException, OSError) as exc:
            raise SandboxUnavailable(f"Docker engine unreachable ({exc})") from exc
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(SESSION_LABEL) != "1":
            return None  # never attach to (or remove) a container that is not one of ours
        if not (info.get("State") or {}).get("Running"):
            await self._gone(info["Id"], "not running")
            return None
        try:
            session = await SandboxSession.attach(
                self.api, info["Id"], self.config, self._on_session_end, self.idle.touch
            )
        except SessionLost:
            await self._gone(info["Id"], "cannot be attached")
            return None
        try:
            if (await session.ping(wait)).get("busy"):
                # The caller holds the thread's lock, so no live worker runs a cell here: this is a
                # cell of a worker that died mid-run. Its result has no one to go to; stop it so the
                # re-run of the job doesn't queue behind it (a cell ignoring SIGINT is killed).
                log.info("sandbox %s: interrupting a cell left running by a dead worker", session.id[:12])
                await session.interrupt()
        except SandboxError as exc:
            self._crashed.add(session.id)
            await session.lose(f"reattach failed: {exc}")
            await self._gone(session.id, "reattach failed")
            return None
        self._take(session, label)
        return session

    async def _gone(self, container_id: str, reason: str) -> None:
        """Make sure a thread's old container is removed before it gets a new one."""
        self._crashed.add(container_id)
        if not await self.remove(container_id, reason):
            raise SandboxUnavailable(f"could not remove the thread's previous sandbox {container_id[:12]} ({reason})")

    async def discard(self, session_id: str) -> None:
        """The thread's session failed under it (SessionLost): remove its container now, so the
        thread's next session is never made while the old one still runs."""
        await self._gone(session_id, "its thread lost it")

    async def destroy(self, session_id: str) -> None:
        """Remove the session's container (thread reset or cleanup); idempotent."""
        self._closing.add(session_id)
        try:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                await session.detach()
            try:
                await asyncio.to_thread(self.api.remove_container, session_id, force=True)
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: auto-remove is already removing it
                    raise
        finally:
            self._closing.discard(session_id)
        self._crashed.discard(session_id)
        self.lost.discard(session_id)
        self.idle.prune(set(self._sessions))

    async def aclose(self) -> None:
        """Stop the pool and remove its unused containers; live sessions stay for reattach."""
        for task in (self._refill_task, self._keepalive_task, self._janitor_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refill_task = self._keepalive_task = self._janitor_task = None
        pool, self._pool = self._pool, []
        for session in pool:
            await self.destroy(session.id)
        for session in list(self._sessions.values()):
            self._closing.add(session.id)
            await session.detach()
        self._sessions.clear()
        self._closing.clear()
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
