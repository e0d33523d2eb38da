"""The host's janitor: removes sandbox containers that cannot be trusted to end by themselves.

The executor exits after its idle TTL, but a cell can freeze it (SIGSTOP), wedge it or answer in its
place, so the host reaps too. Every worker runs a janitor (``SandboxManager(reap=ReapPolicy(...))``)
and ``codeloop sandbox reap`` runs one pass. By label, and whatever the executor says, it removes
sandboxes that

- this process declared lost (a protocol violation, a malformed result, no answer in time);
- are idle past the idle TTL by the host's record: the later of the engine's creation time and the
  last-use stamp that workers write into the container's name (``...-u<epoch seconds>``, renamed at
  most once a ``stamp_period``), so every janitor on every host reads the same record;
- do not answer a ping within ``ping_timeout_s`` on ``strikes`` passes in a row (frozen, paused,
  wedged), pinged only when no worker used them for a while;
- are not running (created but never started, or exited and not yet auto-removed).

Several janitors may run at once: each decides from the engine's listing and its own pings, and
removal is idempotent. Only sandboxes carrying every label of the config are considered, so a
deployment's janitor never touches another's (set ``CODELOOP_SANDBOX_LABELS`` per deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from docker.errors import DockerException

from bot.core.errors import SandboxError
from runner.config import SESSION_LABEL, SandboxConfig, slug
from runner.session import SandboxSession

if TYPE_CHECKING:
    from bot.core.settings import Settings
    from runner.manager import SandboxManager

log = logging.getLogger(__name__)
_STAMP = re.compile(r"-u(\d{1,12})$")
PARALLEL_PINGS = 8


@dataclass(frozen=True)
class ReapPolicy:
    interval_s: float = 60.0
    ping_timeout_s: float = 10.0
    #: unanswered pings in a row, one a pass, before a container is removed
    strikes: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> ReapPolicy:
        return cls(interval_s=settings.sandbox_reap_interval_s, ping_timeout_s=settings.sandbox_ping_timeout_s)


def stamp_period(config: SandboxConfig) -> float:
    """How stale a last-use stamp may be: the idle rule waits this long past the TTL, so a session is
    never removed before it has really been idle for the TTL."""
    return min(60.0, config.idle_ttl_s / 8)


def stamped_name(label: str, when: float | None) -> str:
    """A sandbox's container name: its thread's label, a random part, and the last-use stamp (none
    for a warm container no thread has taken)."""
    name = f"codeloop-{slug(label)}-{uuid.uuid4().hex[:8]}"
    return name if when is None else f"{name}-u{int(when)}"


def stamp_of(name: str) -> float | None:
    match = _STAMP.search(name)
    return float(match.group(1)) if match else None


class IdleRecord:
    """The host's idle record of the sandboxes a thread took from this process: the last-use stamp in
    each container's name, renamed through the engine at most once a ``stamp_period``."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._labels: dict[str, str] = {}  # container id -> its thread's label
        self._stamped: dict[str, float] = {}  # container id -> the stamp its name carries

    def created(self, cid: str, label: str, when: float) -> None:
        """A thread's container was created with a stamped name (``stamped_name``)."""
        self._labels[cid], self._stamped[cid] = label, when

    def take(self, session: SandboxSession, label: str) -> None:
        """A thread took the session (from the pool, or reattached): its use starts now."""
        self._labels[session.id] = label
        session.last_used = time.time()
        self.touch(session)

    def touch(self, session: SandboxSession) -> None:
        """``SandboxSession``'s on_use hook: refresh the stamp if it is a period old."""
        label = self._labels.get(session.id)
        last = self._stamped.get(session.id, 0.0)
        if label is not None and session.last_used - last >= stamp_period(self.manager.config):
            self._stamped[session.id] = session.last_used
            self.manager.spawn(self._stamp(session.id, label, session.last_used, last))

    async def _stamp(self, cid: str, label: str, when: float, previous: float) -> None:
        try:
            await asyncio.to_thread(self.manager.api.rename, cid, stamped_name(label, when))
        except (DockerException, OSError) as exc:
            if self._stamped.get(cid) == when:
                self._stamped[cid] = previous  # the next use tries again
            log.debug("sandbox %s: could not stamp its last use (%s)", cid[:12], exc)

    def prune(self, keep: set[str]) -> None:
        for cid in [cid for cid in self._labels if cid not in keep]:
            self._labels.pop(cid, None)
            self._stamped.pop(cid, None)


class Janitor:
    def __init__(self, manager: SandboxManager, policy: ReapPolicy) -> None:
        self.manager = manager
        self.policy = policy
        self._strikes: dict[str, int] = {}
        #: passes completed (tests wait on it; a pass that failed is not counted)
        self.passes = 0

    @property
    def config(self) -> SandboxConfig:
        return self.manager.config

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            try:
                await self.sweep()
            except (DockerException, OSError, SandboxError) as exc:
                log.warning("sandbox janitor: %s (next pass in %g s)", exc, self.policy.interval_s)
            except Exception:  # a bug must not end host-side reaping for the worker's lifetime
                log.exception("sandbox janitor pass failed (next pass in %g s)", self.policy.interval_s)

    async def _list(self) -> list[dict[str, Any]]:
        labels = [f"{SESSION_LABEL}=1", *(f"{k}={v}" for k, v in self.config.labels.items())]
        found: list[dict[str, Any]] = await asyncio.to_thread(
            self.manager.api.containers, all=True, filters={"label": labels}
        )
        return found

    async def sweep(self) -> list[tuple[str, str]]:
        """One pass; returns (container id, reason) of each container removed."""
        listing = await self._list()
        now = time.time()
        quiet_s = max(self.policy.interval_s, stamp_period(self.config)) + stamp_period(self.config)
        doomed: list[tuple[str, str]] = []
        probe: list[str] = []
        for item in listing:
            cid, state = item["Id"], item.get("State")
            name = (item.get("Names") or ["/"])[0].lstrip("/")
            stamp = stamp_of(name)
            local = self.manager.session(cid)
            last = max(float(item.get("Created") or 0), stamp or 0.0, local.last_used if local else 0.0)
            if cid in self.manager.lost:
                doomed.append((cid, "declared lost"))
            elif state in ("exited", "dead") or (
                state == "created" and now - float(item.get("Created") or 0) > self.config.start_timeout_s + 5
            ):
                doomed.append((cid, f"not running ({state})"))
            elif state not in ("running", "paused"):
                continue  # being created, removed or restarted by the engine
            elif now - last > self.config.idle_ttl_s + stamp_period(self.config):
                doomed.append((cid, f"idle for {now - last:.0f} s (TTL {self.config.idle_ttl_s:g} s)"))
            elif state == "paused":
                self._strike(cid, "paused", doomed)
            elif stamp is not None and now - last > quiet_s and not (local and local.busy):
                probe.append(cid)  # a thread's container nobody used for a while: is its executor there?
        gate = asyncio.Semaphore(PARALLEL_PINGS)

        async def check(cid: str) -> None:
            async with gate:
                if await self._probe(cid):
                    self._strikes.pop(cid, None)
                else:
                    self._strike(cid, f"no answer to a ping within {self.policy.ping_timeout_s:g} s", doomed)

        await asyncio.gather(*(check(cid) for cid in probe))
        seen = {item["Id"] for item in listing}
        for cid in list(self._strikes):
            if cid not in seen:
                del self._strikes[cid]
        removed = []
        for cid, reason in doomed:
            if await self.manager.remove(cid, reason):
                removed.append((cid, reason))
                self._strikes.pop(cid, None)
        self.manager.forget_lost(seen)
        self.passes += 1
        return removed

    def _strike(self, cid: str, why: str, doomed: list[tuple[str, str]]) -> None:
        count = self._strikes[cid] = self._strikes.get(cid, 0) + 1
        log.info("sandbox %s: %s (%d of %d)", cid[:12], why, count, self.policy.strikes)
        if count >= self.policy.strikes:
            doomed.append((cid, f"{why}, {count} times in a row"))

    async def _probe(self, cid: str) -> bool:
        local = self.manager.session(cid)
        if local is not None:
            return await local.probe(self.policy.ping_timeout_s)
        try:
            session = await SandboxSession.attach(self.manager.api, cid, self.config)
        except SandboxError:
            return False
        try:
            return await session.probe(self.policy.ping_timeout_s)
        finally:
            with contextlib.suppress(Exception):
                await session.detach()


async def reap_once(manager: SandboxManager) -> list[tuple[str, str]]:
    """``codeloop sandbox reap``: as many passes as a strike-out needs, ``ping_timeout_s`` apart."""
    janitor = Janitor(manager, manager.reap)
    removed = []
    for attempt in range(janitor.policy.strikes):
        if attempt:
            await asyncio.sleep(min(janitor.policy.ping_timeout_s, 5.0))
        removed += await janitor.sweep()
    return removed
