"""Reading a reply stream on the adapter side: at-least-once delivery, idempotent rendering.

Each adapter kind has one reply stream (``<prefix>:replies:<adapter>``) read through a consumer
group, so a restarted adapter resumes where it left off and replicas share the work. Before an
event is rendered, its field in ``rendered:<job>`` (a hash: the seq, or ``terminal``) is claimed
once (HSETNX with a token, so a resend after a Redis restart is recognised as our own); a terminal
event is claimed once per job, so a job re-run after a worker died never shows two final replies.
An entry is deleted with its ack (XACK + XDEL, one round trip): a rendered job leaves its claims
behind (a few bytes an event, for ``idempotency_ttl_s``) and nothing else. The stream has one
consumer group, the adapter's, so no other reader still needs an entry it deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot.core.jobs import Event
from bot.core.settings import Settings
from bot.queue.autopipe import AutoPipeline, LuaScript
from bot.queue.redis_conn import run_replicated_patiently

log = logging.getLogger(__name__)

Handler = Callable[[Event], Awaitable[None]]
PENDING_CHECK_S = 2.0  # how often a reader re-reads entries delivered to it but not acked
ORPHAN_CHECK_S = 30.0
ORPHAN_IDLE_S = 60.0  # an entry pending this long belongs to a replica that died


# KEYS: rendered:<job>   ARGV: field, token, ttl   -> 1 the first time (or our own resend), else 0
_CLAIM = LuaScript("""
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] and 1 or 0
""")


def reply_stream(settings: Settings, adapter: str) -> str:
    return settings.key("replies", adapter)


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """The adapter's consumer group on its reply stream, made (with the stream) if missing."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class ReplyReader:
    def __init__(self, redis: aioredis.Redis, settings: Settings, adapter: str, consumer: str | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.stream = reply_stream(settings, adapter)
        self.group = adapter
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.scripts = AutoPipeline(redis)

    async def ensure_group(self) -> None:
        await ensure_group(self.redis, self.stream, self.group)

    async def claim(self, event: Event) -> bool:
        """True the first time this (job, seq) — or this job's terminal event — is seen."""
        slot = "terminal" if event.terminal else str(event.seq)
        key = self.settings.key("rendered", event.job_id)
        token = uuid.uuid4().hex[:16]
        args = [slot, token, self.settings.idempotency_ttl_s]
        if self.settings.redis_min_replicas:
            # On the replicas before it is shown: a master that dies right after a reply was
            # shown cannot take the claim with it, so a re-run of the job is not shown twice.
            # Rendering waits while no replica answers (the same token makes a retry ours).
            reply = await run_replicated_patiently(self.redis, self.settings, _CLAIM, [key], args, touch=key,
                                                   ttl_s=self.settings.idempotency_ttl_s, what=f"reply claim {key}")
            if reply is not None:
                return bool(reply)
        return bool(await self.scripts.run(_CLAIM, [key], args))

    async def run(self, handler: Handler, stop: asyncio.Event | None = None, block_ms: int = 1000) -> None:
        """Render events until ``stop`` is set. Our own pending entries (from a crash) go first, and
        are looked at again every ``PENDING_CHECK_S``: an XREADGROUP whose reply a Redis restart lost
        was resent by the client and moved past entries that are now delivered to us but unseen.
        Entries a dead replica left pending are taken over after ``ORPHAN_IDLE_S``."""
        await self.ensure_group()
        start_id = "0"  # first drain what this consumer had pending, then new entries
        loop = asyncio.get_running_loop()
        next_pending = next_orphans = loop.time() + PENDING_CHECK_S
        while stop is None or not stop.is_set():
            try:
                if loop.time() >= next_orphans:
                    next_orphans = loop.time() + ORPHAN_CHECK_S
                    await self._take_orphans(handler)
                if start_id == ">" and loop.time() >= next_pending:
                    start_id = "0"
                resp = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start_id},
                                                   count=64, block=None if start_id == "0" else block_ms)
            except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
                log.warning("reply reader lost Redis (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            entries = [e for _, batch in resp or [] for e in batch]
            if start_id == "0" and not entries:
                start_id = ">"
                next_pending = loop.time() + PENDING_CHECK_S
                continue
            for entry_id, fields in entries:
                await self._handle(entry_id, fields, handler)

    async def _take_orphans(self, handler: Handler) -> None:
        resp = await self.redis.xautoclaim(self.stream, self.group, self.consumer, int(ORPHAN_IDLE_S * 1000),
                                           "0-0", count=64)
        for entry_id, fields in (resp[1] if resp else []):
            await self._handle(entry_id, fields, handler)

    async def _done(self, entry_id: bytes | str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _handle(self, entry_id: bytes | str, fields: dict[bytes, bytes] | None, handler: Handler) -> None:
        if not fields:  # trimmed away while pending
            await self.redis.xack(self.stream, self.group, entry_id)
            return
        raw = fields.get(b"event") or fields.get("event")  # type: ignore[call-overload]
        try:
            event = Event.loads(raw) if raw is not None else None
        except ValueError as exc:
            log.error("unreadable reply entry %r: %s", entry_id, exc)
            event = None
        if event is not None and await self.claim(event):
            try:
                await handler(event)
            except Exception:
                # A rendering failure must not wedge the stream; the platform layer already retried.
                log.exception("rendering %s #%d (%s) failed", event.job_id, event.seq, event.type)
        await self._done(entry_id)
