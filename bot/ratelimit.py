"""Rate limits and fairness: who may start a job now, and how many of one user's jobs run at once.

Two controls, because they answer different abuses:

* ``RateLimiter``: token buckets in Redis, one per user and one per channel. A bucket holds N
  tokens and refills at N per minute, so a user may burst N requests, then sustain N a minute.
  Both buckets of a job are checked and charged by one Lua script, atomically across every
  worker: a request the channel refuses costs the user nothing. The clock is Redis's ``TIME``,
  so workers with skewed clocks still agree.
* ``UserSlots``: at most ``cap`` running jobs per user in a worker. Jobs over the cap wait
  without holding one of the worker's slots, so a user who starts twenty long jobs leaves the
  remaining slots to everyone else.

A limit of 0 turns that bucket off (benchmarks, single-user deployments).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from bot.errors import CodeloopError
from bot.jobs import Job
from bot.settings import Settings

# KEYS: bucket keys   ARGV: capacity per key (tokens, refilled over 60 s)
# Returns {allowed, seconds to wait (string: Lua numbers reach Redis as integers), index of the
# bucket that refused}. A missing key is a full bucket, so keys expire once they would be full.
_TAKE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local left, wait, which = {}, 0, 0
for i = 1, #KEYS do
  local cap = tonumber(ARGV[i])
  local rate = cap / 60.0
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local have = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or t
  have = math.min(cap, have + math.max(0, t - ts) * rate)
  left[i] = have
  if have < 1 then
    local w = (1 - have) / rate
    if w > wait then wait, which = w, i end
  end
end
if which > 0 then return {0, tostring(wait), which} end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'tokens', tostring(left[i] - 1), 'ts', tostring(t))
  redis.call('EXPIRE', KEYS[i], 61)
end
return {1, '0', 0}
"""


class RateLimited(CodeloopError):
    """A user or channel sent more requests than its limit allows; says when to try again."""

    kind = "rate_limited"

    def __init__(self, scope: str, limit: int, retry_after_s: float) -> None:
        self.scope = scope
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(self.user_message())

    def user_message(self) -> str:
        wait = max(1, math.ceil(self.retry_after_s))
        if self.scope == "reset":
            return (f"You're resetting sessions faster than {self.limit} per minute; try again in {wait}s. "
                    "Nothing was reset.")
        who = "You're" if self.scope == "user" else "This channel is"
        return (f"{who} sending requests faster than {self.limit} per minute; try again in {wait}s. "
                "This request was not run.")


@dataclass(frozen=True)
class _Bucket:
    scope: str
    key: str
    limit: int


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.settings = settings
        self._take = redis.register_script(_TAKE)

    def _buckets(self, job: Job) -> list[_Bucket]:
        conv = job.conversation
        candidates = [
            _Bucket("user", self.settings.key("rate", "user", conv.platform, conv.workspace, job.user),
                    self.settings.rate_user_per_min),
            _Bucket("channel", self.settings.key("rate", "channel", conv.platform, conv.workspace, conv.channel),
                    self.settings.rate_channel_per_min),
        ]
        return [b for b in candidates if b.limit > 0]

    async def take(self, job: Job) -> None:
        """Charge one request to the job's user and channel; ``RateLimited`` if either is empty."""
        await self._charge(self._buckets(job))

    async def take_reset(self, job: Job) -> None:
        """Charge a reset to its user's reset bucket (``rate_reset_per_min``): each one destroys a
        container and the next message builds another, so a loop of resets is load on the host."""
        conv = job.conversation
        bucket = _Bucket("reset", self.settings.key("rate", "reset", conv.platform, conv.workspace, job.user),
                         self.settings.rate_reset_per_min)
        await self._charge([bucket] if bucket.limit > 0 else [])

    async def _charge(self, buckets: list[_Bucket]) -> None:
        if not buckets:
            return
        allowed, wait, which = await self._take(keys=[b.key for b in buckets], args=[b.limit for b in buckets])
        if not int(allowed):
            bucket = buckets[int(which) - 1]
            raise RateLimited(bucket.scope, bucket.limit, float(wait))


def user_key(job: Job) -> str:
    conv = job.conversation
    return f"{conv.platform}/{conv.workspace}/{job.user}"


class UserSlots:
    """A per-user semaphore that forgets users with nothing running or waiting (no growth over
    millions of users). ``waiting`` counts jobs parked on a cap; the worker doesn't count those
    against its intake, or one user's backlog would stop it reading anyone else's jobs."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.waiting = 0
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        sem, users = self._slots.get(key) or (asyncio.Semaphore(self.cap), 0)
        self._slots[key] = (sem, users + 1)
        try:
            if sem.locked():
                self.waiting += 1
                try:
                    await sem.acquire()
                finally:
                    self.waiting -= 1
            else:
                await sem.acquire()
            try:
                yield
            finally:
                sem.release()
        finally:
            sem, users = self._slots[key]
            if users <= 1:
                del self._slots[key]
            else:
                self._slots[key] = (sem, users - 1)
