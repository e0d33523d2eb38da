"""Several sandbox engines: a new session goes to the freest, a thread's session id names its engine.

``CODELOOP_SANDBOX_ENGINES`` lists Docker endpoints (runner/engine_list.py), each normally a
codeloop docker proxy on its host (a Unix socket, or ``tcp://`` with TLS and a client certificate)::

    a=unix:///run/codeloop/docker.sock,b=tcp://sandbox-engine-1.sandbox-engine:2376?sessions=200&memory=96g

Each engine gets its own ``SandboxManager`` (its own docker client, warm pool and janitor). A thread
records ``"<engine>/<container id>"``, so any worker reattaches on the right engine; a bare id (a
thread from before engines were listed) belongs to the first engine.

Placement: free capacity is the smaller of the free session and memory fractions against the
engine's limits, where the sessions are the engine's codeloop sandboxes (counted by label like the
janitor: every deployment's, or only this one's when ``CODELOOP_SANDBOX_LABELS`` sets its labels;
cached ``count_ttl_s``, plus the ones this process placed since) and their memory is that count
times the per-sandbox limit. The freest engine that answers gets the session; ties go to one with
a warm container ready, then to the one with fewer sessions, then to the first listed.

An engine that stops answering (bounded by ``timeout_s`` per call and per connect) is set aside for
``retry_s``; a thread whose session lived there gets "session lost, starting fresh" on another
engine. If the engine was only unreachable, its container is in that engine's ``lost`` set and its
janitor removes it once the engine answers again (the container's idle TTL ends it otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, TypeAlias

from docker.errors import DockerException
from docker.utils import parse_bytes

from bot.core.errors import ConfigError, SandboxUnavailable
from runner.config import SESSION_LABEL, SandboxConfig
from runner.engine_list import EngineSpec, parse_engines
from runner.janitor import ReapPolicy
from runner.manager import SandboxManager
from runner.session import SandboxSession

if TYPE_CHECKING:
    from bot.core.settings import Settings

__all__ = ["EngineSet", "EngineSpec", "Sandboxes", "make_sandboxes", "parse_engines"]
log = logging.getLogger(__name__)
#: lead sentences: bot/worker/sandbox_link.py adds what became of the variables and the thread's files
UNREACHABLE_NOTE = (
    "The previous Python session's sandbox host ({name}) is unreachable; this is a fresh session on another host."
)
UNKNOWN_NOTE = "The previous Python session ran on a sandbox host ({name}) this deployment no longer uses."


class Engine:
    """One engine: its manager, its last count of sandboxes, and whether it answered lately."""

    def __init__(self, spec: EngineSpec, manager: SandboxManager, per_session: int, count_ttl_s: float,
                 timeout_s: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.name = spec.name
        self.manager = manager
        self.per_session = per_session  # bytes: this deployment's memory limit per sandbox
        self.count_ttl_s = count_ttl_s
        self.sessions = 0  # codeloop sandboxes on the engine at the last count, plus placed since
        self.counted_at = float("-inf")
        self.down_until = 0.0
        self.error: str | None = None
        self.started = False

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def set_aside(self, why: object, retry_s: float) -> None:
        if self.up:
            log.warning("sandbox engine %s unreachable (%s); set aside for %g s", self.name, why, retry_s)
        self.error = str(why)
        self.down_until = time.monotonic() + retry_s
        self.counted_at = float("-inf")

    @property
    def free(self) -> float:
        """Free fraction: the smaller of sessions and memory left against the limits."""
        used = self.sessions / self.spec.max_sessions
        if self.spec.max_memory:
            used = max(used, self.sessions * self.per_session / self.spec.max_memory)
        return 1.0 - used

    async def count(self) -> None:
        """Refresh the count of sandboxes if it is older than the TTL: every codeloop sandbox on the
        engine, or with CODELOOP_SANDBOX_LABELS set, this deployment's (its share of the engine)."""
        if time.monotonic() - self.counted_at < self.count_ttl_s:
            return
        labels = [f"{SESSION_LABEL}=1", *(f"{k}={v}" for k, v in self.manager.config.labels.items())]
        listing = await asyncio.to_thread(self.manager.api.containers, all=True, filters={"label": labels})
        self.sessions, self.counted_at, self.error = len(listing), time.monotonic(), None

    async def answers(self) -> bool:
        """Whether the engine answers a ping on a new connection (a pooled one may outlive a daemon
        that is shutting down and has already removed its socket)."""

        def ping() -> None:
            client = self.spec.client(self.timeout_s)
            try:
                client.ping()
            finally:
                client.close()

        try:
            await asyncio.to_thread(ping)
        except (DockerException, OSError):
            return False
        return True


class EngineSet:
    """The worker's sandboxes on several engines; the same calls as ``SandboxManager``."""

    def __init__(
        self,
        specs: list[EngineSpec],
        config: SandboxConfig,
        reap: ReapPolicy | None = None,
        timeout_s: float = 20.0,
        count_ttl_s: float = 2.0,
        retry_s: float | None = None,
    ) -> None:
        if not specs:
            raise ConfigError("no sandbox engines listed")
        self.config = config
        self.retry_s = retry_s if retry_s is not None else max(5.0, timeout_s)
        per_session = parse_bytes(config.memory)
        # the worker's warm pool is split over the engines (at least one each when there is one),
        # not repeated on each: warm containers count against an engine's capacity too
        each = dataclasses.replace(config, pool_size=-(-config.pool_size // len(specs)))
        self.engines = [
            Engine(spec, SandboxManager(each, spec.client(timeout_s), reap), per_session, count_ttl_s, timeout_s)
            for spec in specs
        ]
        self._by_name = {engine.name: engine for engine in self.engines}
        self._retry: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, config: SandboxConfig, reap: ReapPolicy | None) -> EngineSet:
        specs = parse_engines(settings.sandbox_engines, settings.sandbox_engine_sessions,
                              settings.sandbox_engine_memory, settings.sandbox_engine_tls_dir)
        return cls(specs, config, reap, timeout_s=settings.sandbox_engine_timeout_s)

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every engine that answers; the worker runs if one does, the rest are retried."""
        results = await asyncio.gather(*(self._start(e) for e in self.engines), return_exceptions=True)
        failed = [(e, r) for e, r in zip(self.engines, results, strict=True) if isinstance(r, BaseException)]
        for _, exc in failed:
            if not isinstance(exc, SandboxUnavailable):
                raise exc
        if len(failed) == len(self.engines):
            raise SandboxUnavailable("no sandbox engine answers: " + "; ".join(f"{e.name}: {x}" for e, x in failed))
        if failed and self._retry is None:
            self._retry = asyncio.create_task(self._retry_loop())

    async def _start(self, engine: Engine) -> None:
        try:
            await engine.manager.start()
        except SandboxUnavailable as exc:
            engine.set_aside(exc, self.retry_s)
            raise
        engine.started = True

    async def _retry_loop(self) -> None:
        while not all(e.started for e in self.engines):
            await asyncio.sleep(self.retry_s)
            for engine in self.engines:
                if not engine.started:
                    with contextlib.suppress(SandboxUnavailable):
                        await self._start(engine)
                        log.info("sandbox engine %s answers again", engine.name)

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        for engine in self.engines:
            await engine.manager.aclose()

    # --- ids --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> tuple[Engine | None, str, str]:
        """(engine or None if unknown, container id, engine name) of a thread's session id."""
        name, slash, cid = ref.rpartition("/")
        if not slash:
            return self.engines[0], ref, self.engines[0].name  # recorded before engines were listed
        return self._by_name.get(name), cid, name

    def _mark(self, engine: Engine, session: SandboxSession) -> SandboxSession:
        session.ref = f"{engine.name}/{session.id}"
        return session

    def session(self, ref: str) -> SandboxSession | None:
        engine, cid, _ = self.resolve(ref)
        return engine.manager.session(cid) if engine is not None else None

    @property
    def pool_ready(self) -> int:
        return sum(e.manager.pool_ready for e in self.engines)

    async def wait_pool(self) -> None:
        await asyncio.gather(*(e.manager.wait_pool() for e in self.engines if e.started))

    # --- sessions ---------------------------------------------------------------------------
    async def acquire(self, session_id: str | None, label: str) -> tuple[SandboxSession, str | None]:
        """The thread's session on its engine, else a fresh one on the freest engine (with a note)."""
        note = None
        if session_id:
            engine, cid, name = self.resolve(session_id)
            if engine is None:
                note = UNKNOWN_NOTE.format(name=name)
            elif not engine.up:
                engine.manager.lost.add(cid)  # its janitor removes it if the engine comes back
                note = UNREACHABLE_NOTE.format(name=name)
            else:
                try:
                    session, note = await engine.manager.resume(cid, label)
                except SandboxUnavailable as exc:
                    if await engine.answers():
                        raise  # the engine is there but refused: not a reason to move the thread
                    engine.set_aside(exc, self.retry_s)
                    engine.manager.lost.add(cid)
                    note = UNREACHABLE_NOTE.format(name=name)
                else:
                    if session is not None:
                        return self._mark(engine, session), None
        return await self.place(label), note

    async def place(self, label: str) -> SandboxSession:
        """A fresh session on the engine with the most free capacity that answers."""
        candidates = [e for e in self.engines if e.up and e.started]

        async def count(engine: Engine) -> None:
            try:
                await engine.count()
            except (DockerException, OSError) as exc:
                engine.set_aside(exc, self.retry_s)

        await asyncio.gather(*(count(e) for e in candidates))
        ranked = sorted((e for e in candidates if e.up and e.free > 0),
                        key=lambda e: (-e.free, not e.manager.pool_ready, e.sessions, self.engines.index(e)))
        problem: SandboxUnavailable | None = None
        for engine in ranked:
            try:
                session = await engine.manager.fresh(label)
            except SandboxUnavailable as exc:
                problem = exc
                if not await engine.answers():
                    engine.set_aside(exc, self.retry_s)
                continue
            engine.sessions += 1  # counted until the next listing
            return self._mark(engine, session)
        if problem is not None:
            raise problem
        if any(e.up and e.started for e in self.engines):
            raise SandboxUnavailable("every sandbox engine is at its limit (CODELOOP_SANDBOX_ENGINE_SESSIONS, "
                                     "CODELOOP_SANDBOX_ENGINE_MEMORY); try again shortly")
        raise SandboxUnavailable("no sandbox engine answers: " + "; ".join(
            f"{e.name}: {e.error or 'not started'}" for e in self.engines))

    async def discard(self, session_id: str) -> None:
        """The thread's session failed under it: removed now, or, if its engine is gone, when the
        engine returns (its janitor); either way the thread's next session is made elsewhere."""
        engine, cid, _ = self.resolve(session_id)
        if engine is None:
            return
        try:
            await engine.manager.discard(cid)
        except SandboxUnavailable as exc:
            if await engine.answers():
                raise
            engine.set_aside(exc, self.retry_s)
            engine.manager.lost.add(cid)

    async def destroy(self, session_id: str) -> None:
        """Remove the session's container (thread reset); an unreachable engine's janitor does it later."""
        engine, cid, _ = self.resolve(session_id)
        if engine is None:
            return
        try:
            await engine.manager.destroy(cid)
        except (DockerException, OSError) as exc:
            if await engine.answers():
                raise
            engine.set_aside(exc, self.retry_s)
            engine.manager.lost.add(cid)


#: what the worker holds: one engine (DOCKER_HOST, the zero-config default) or several
Sandboxes: TypeAlias = SandboxManager | EngineSet


def make_sandboxes(settings: Settings, config: SandboxConfig, reap: ReapPolicy | None) -> Sandboxes:
    if settings.sandbox_engines:
        return EngineSet.from_settings(settings, config, reap)
    return SandboxManager(config, reap=reap)
