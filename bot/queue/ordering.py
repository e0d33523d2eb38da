"""Signals a worker listens to: Stop requests and conversations advancing their turn.

One pub/sub connection per worker. A job waits until every earlier job of its conversation has
finished: a job finished by this worker wakes the next one directly (``advance``), one finished
elsewhere through pub/sub (published only for jobs that found themselves early and said so in
Redis, see ``conv:<key>:waiting``), and a poll backing off to a few seconds covers lost messages
(pub/sub is fire-and-forget, e.g. across a Redis restart). A waiter never waits forever: jobs
ahead of it whose entries are gone are skipped by the turn check itself, and one that neither
runs nor finishes for ``turn_wait_s`` is skipped by the waiter (``StuckTurn``,
``JobQueue.skip_stuck``); either is dead-lettered with the reason and its user told.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import redis.asyncio as aioredis

from bot.core.jobs import Job
from bot.queue.stream import JobQueue

log = logging.getLogger(__name__)
#: a waiting job re-checks its turn after this long without a wake-up, doubling up to POLL_MAX_S:
#: wake-ups cover every finish, so the poll only recovers one lost in a Redis restart, and a
#: backlog of waiting jobs must not turn into a stream of re-checks
POLL_S = 0.5
POLL_MAX_S = 4.0


class StuckTurn:
    """When a waiter gives up on the job ahead of it: the conversation's ``done`` counter has not
    moved, and nothing has held its lock, for ``limit_s`` (a running job holds the lock, and its
    own timeouts bound it; a dead worker's job is reclaimed well within the limit)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.done: int | None = None
        self.since = time.monotonic()

    @property
    def waited_s(self) -> float:
        return time.monotonic() - self.since

    def expired(self, done: int, lock_ms: int) -> bool:
        """``lock_ms``: the lock's PTTL (-2: nobody holds it)."""
        if done != self.done or lock_ms != -2:
            self.done, self.since = done, time.monotonic()
            return False
        return self.waited_s >= self.limit_s


class Signals:
    def __init__(self, redis: aioredis.Redis, queue: JobQueue, on_cancel: Callable[[str], None]) -> None:
        self.redis = redis
        self.queue = queue
        self.on_cancel = on_cancel
        #: conversation key -> (seq, wake-up) of each job here waiting for its turn
        self._waiters: dict[str, set[tuple[int, asyncio.Event]]] = defaultdict(set)
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
                    data = message["data"].decode()
                    if channel == self.queue.cancel_channel:
                        self.on_cancel(data)
                    else:
                        done, _, key = data.partition(":")  # "<done seq>:<conversation key>"
                        if done.isdigit():
                            self.advance(key, int(done))
                        else:  # a worker from before this format: wake the whole conversation
                            self.advance(data)
            except (aioredis.ConnectionError, OSError) as exc:
                log.warning("signal channel lost (%s); resubscribing in 1s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    @contextlib.contextmanager
    def waiter(self, conversation_key: str, seq: int) -> Iterator[asyncio.Event]:
        """An event set when job ``seq`` of the conversation may be next; register before checking."""
        entry = (seq, asyncio.Event())
        self._waiters[conversation_key].add(entry)
        try:
            yield entry[1]
        finally:
            self._waiters[conversation_key].discard(entry)
            if not self._waiters[conversation_key]:
                del self._waiters[conversation_key]

    def advance(self, conversation_key: str, done: int | None = None) -> None:
        """Job ``done`` of the conversation finished: wake the job after it (only that one, so a
        thread with a backlog costs one ``begin`` per job, not one per waiter). ``done=None``
        wakes every waiter of the conversation."""
        for seq, event in self._waiters.get(conversation_key, ()):
            if done is None or seq <= done + 1:
                event.set()

    @staticmethod
    async def sleep(wake: asyncio.Event, tries: int = 0) -> None:
        """Until woken, or the poll period of this many earlier tries passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(POLL_MAX_S, POLL_S * 2 ** min(tries, 8))):  # no task, unlike wait_for
                await wake.wait()
        wake.clear()

    async def wait_turn(self, job: Job, limit_s: float) -> None:
        """Return once the job before this one in its conversation has finished (or was skipped)."""
        stuck = StuckTurn(limit_s)
        with self.waiter(job.conversation.key, job.seq) as wake:
            for tries in itertools.count():
                wake.clear()
                done, lock_ms = await self.queue.turn(job)
                if done >= job.seq - 1:
                    return
                if stuck.expired(done, lock_ms) and await self.queue.skip_stuck(job, done, stuck.waited_s):
                    continue
                await self.sleep(wake, tries)
