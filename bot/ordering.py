"""Signals a worker listens to: Stop requests and conversations advancing their turn.

One pub/sub connection per worker. ``wait_turn`` blocks a job until every earlier job of its
conversation has finished; pub/sub wakes it at once, and a slow poll covers lost messages
(pub/sub is fire-and-forget, e.g. across a Redis restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

import redis.asyncio as aioredis

from bot.jobs import Job
from bot.queue import JobQueue

log = logging.getLogger(__name__)
POLL_S = 0.5


class Signals:
    def __init__(self, redis: aioredis.Redis, queue: JobQueue, on_cancel: Callable[[str], None]) -> None:
        self.redis = redis
        self.queue = queue
        self.on_cancel = on_cancel
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="codeloop-signals")
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.queue.cancel_channel, self.queue.turn_channel)
                self._ready.set()
                async for message in pubsub.listen():
                    channel = message["channel"].decode()
                    key = message["data"].decode()
                    if channel == self.queue.cancel_channel:
                        self.on_cancel(key)
                    else:
                        for event in self._waiters.get(key, ()):
                            event.set()
            except (aioredis.ConnectionError, OSError) as exc:
                log.warning("signal channel lost (%s); resubscribing in 1s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def wait_turn(self, job: Job) -> None:
        """Return once the job before this one in its conversation has finished."""
        key = job.conversation.key
        wake = asyncio.Event()
        self._waiters[key].add(wake)
        try:
            while True:
                wake.clear()
                done = int(await self.redis.get(self.queue.conv_key(job.conversation, "done")) or 0)
                if done >= job.seq - 1:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=POLL_S)
        finally:
            self._waiters[key].discard(wake)
            if not self._waiters[key]:
                del self._waiters[key]
