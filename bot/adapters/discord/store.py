"""What the Discord adapter remembers in Redis, so a restarted bot (or a replica) carries on.

    discord:thread:<id>     the Conversation a thread belongs to: only threads listed here are ours
    discord:job:<id>        the Job as enqueued, for the Stop and Re-run buttons (which may be pressed
                            long after the process that posted them is gone)
    discord:active:<user>   sorted set job id -> lease expiry: the user's running jobs

Each record lives as long as a conversation (``conversation_ttl_s``); active-job leases expire on
their own so a terminal event lost in a crash cannot lock a user out for good.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Job
from bot.core.settings import Settings

# KEYS: active zset   ARGV: now, lease expiry, limit, job id, key ttl
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class DiscordStore:
    def __init__(self, redis: aioredis.Redis[Any], settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._reserve = redis.register_script(_RESERVE)
        # A lease long enough for every round to use its whole model and cell timeouts, plus
        # queueing time; it only matters when the job's terminal event never arrives.
        per_round = settings.llm_timeout_s + settings.sandbox_cell_timeout_s
        self.lease_s = int((settings.max_rounds + 1) * per_round + 600)

    def _key(self, *parts: str) -> str:
        return self.settings.key("discord", *parts)

    # --- threads -------------------------------------------------------------------------------
    async def save_thread(self, thread_id: int, conversation: Conversation) -> None:
        await self.redis.set(self._key("thread", str(thread_id)), conversation.model_dump_json(),
                             ex=self.settings.conversation_ttl_s)

    async def thread(self, thread_id: int) -> Conversation | None:
        """The conversation of one of our threads (its TTL renewed), or None for anyone else's."""
        key = self._key("thread", str(thread_id))
        raw = await self.redis.get(key)
        if raw is None:
            return None
        await self.redis.expire(key, self.settings.conversation_ttl_s)
        return Conversation.model_validate_json(raw)

    # --- jobs ----------------------------------------------------------------------------------
    async def save_job(self, job: Job) -> None:
        await self.redis.set(self._key("job", job.id), job.dumps(), ex=self.settings.conversation_ttl_s)

    async def job(self, job_id: str) -> Job | None:
        raw = await self.redis.get(self._key("job", job_id))
        return Job.loads(raw) if raw is not None else None

    # --- per-user concurrency ------------------------------------------------------------------
    async def reserve(self, user_id: str, job_id: str, limit: int) -> bool:
        """Take one of the user's ``limit`` slots for ``job_id``; False when all are in use."""
        now = time.time()
        ok = await self._reserve(keys=[self._key("active", user_id)],
                                 args=[now, now + self.lease_s, limit, job_id, self.lease_s])
        return bool(ok)

    async def release(self, user_id: str, job_id: str) -> None:
        await self.redis.zrem(self._key("active", user_id), job_id)

    async def active(self, user_id: str) -> int:
        key = self._key("active", user_id)
        await self.redis.zremrangebyscore(key, "-inf", time.time())
        return int(await self.redis.zcard(key))
