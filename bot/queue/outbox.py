"""A job's events on their way to its reply stream: in order, batched, never lost to a blip.

``put`` never waits on Redis. Events go out in the background, a batch per round trip; those
that pile up while a batch is in flight form the next batch. Whatever is still unsent when the
job ends travels with its terminal event in the finish script (``JobQueue.finish``) — so a
job whose reply needs no waiting (a quick answer) reaches the adapter in a single round trip.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from bot.core.jobs import Event
from bot.queue.stream import JobQueue

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, queue: JobQueue, reply_stream: str) -> None:
        self.queue = queue
        self.reply_stream = reply_stream
        self._pending: list[str] = []
        self._flushing: asyncio.Task[None] | None = None
        self._kicked = False

    def put(self, event: Event) -> None:
        self._pending.append(event.dumps())
        if not self._kicked and (self._flushing is None or self._flushing.done()):
            # At the end of this tick, not now: the events a job emits before it next waits join
            # one batch, and a job that finishes within the tick sends them with its final.
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        self._kicked = False
        if self._pending and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.queue.publish_many(self.reply_stream, batch)
            except (RedisError, OSError) as exc:
                # Keep them, in order, for the next flush or for the finish script.
                self._pending[:0] = batch
                log.warning("could not publish %d event(s) yet (%s); they go with the next batch", len(batch), exc)
                return

    async def drain(self) -> list[str]:
        """Wait for a batch in flight; returns the events not yet sent, oldest first (the caller
        sends them together with the terminal event)."""
        taken, self._pending = self._pending, []
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
        rest, self._pending = self._pending + taken, []
        return rest
