"""Who may stop, re-run or reset what, shared by both adapters.

* A **job** belongs to its requester: only they or a moderator may stop or re-run it.
* A **conversation** belongs to whoever started it (its first request): only they or a
  moderator may reset it, since a reset throws away everyone's variables and files in it.
* Who is a **moderator** is the platform's business (Slack: workspace admins and owners, or
  ``CODELOOP_SLACK_MODERATORS``; Discord: Manage Messages in the channel); adapters pass a check.
* Resets are rate-limited per user (``CODELOOP_RATE_RESET_PER_MIN``, ``bot.queue.ratelimit``).

Typed ``stop`` names no job, so the adapters keep, per conversation, the jobs they enqueued and
have not yet seen end. Redis keys (under the prefix; both live as long as a conversation):

    ctl:jobs:<conversation key>    hash job id -> requester, added after enqueue, removed when the
                                   adapter renders the job's terminal event
    ctl:owner:<conversation key>   the user who started the conversation

A terminal event lost in a crash leaves its job listed until the TTL; stopping a job that has
already ended does nothing. A conversation with no recorded owner (it started before this was
deployed) may be reset by anyone allowed to use it, and its next request records its owner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from bot.core.jobs import Conversation, Job
from bot.core.settings import Settings
from bot.queue.ratelimit import RateLimited, RateLimiter

Action = Literal["stop", "re-run", "reset"]
IsModerator = Callable[[], Awaitable[bool]]
Mention = Callable[[str], str]


def known(value: bool) -> IsModerator:
    """A moderator check whose answer is already known (Discord sends permissions along)."""
    async def check() -> bool:
        return value
    return check


def not_yours(action: Action, owners: list[str], mention: Mention) -> str:
    """The refusal for someone who is neither the owner nor a moderator."""
    who = " or ".join(mention(o) for o in owners) or "the person who asked"
    if action == "reset":
        return f"Only {who}, who started this conversation, or a moderator can reset it."
    return f"Only {who} or a moderator can {action} this run."


@dataclass
class StopPlan:
    """What a typed ``stop`` does: the jobs to stop, or why nothing is stopped."""

    targets: list[str] = field(default_factory=list)
    refusal: str | None = None


class Ownership:
    def __init__(self, redis: aioredis.Redis[Any], settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.limiter = RateLimiter(redis, settings)

    def _key(self, name: str, conversation: Conversation) -> str:
        return self.settings.key("ctl", name, conversation.key)

    # --- records -------------------------------------------------------------------------------
    async def started(self, job: Job) -> None:
        """A message job is on the queue: list it as running in its conversation and, if the
        conversation has no owner yet, make its requester the owner."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.record(pipe, job)
            await pipe.execute()

    def record(self, pipe: Pipeline[Any], job: Job) -> None:
        """``started``'s commands, added to a pipeline the caller runs (sharing its round trip)."""
        ttl = self.settings.conversation_ttl_s
        jobs, owner = self._key("jobs", job.conversation), self._key("owner", job.conversation)
        pipe.hset(jobs, job.id, job.user)
        pipe.expire(jobs, ttl)
        pipe.set(owner, job.user, nx=True, ex=ttl)
        pipe.expire(owner, ttl)

    async def ended(self, conversation: Conversation, job_id: str) -> None:
        await self.redis.hdel(self._key("jobs", conversation), job_id)

    async def active(self, conversation: Conversation) -> dict[str, str]:
        """Job id -> requester of the conversation's jobs not yet seen to end."""
        raw = await self.redis.hgetall(self._key("jobs", conversation))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def owner(self, conversation: Conversation) -> str | None:
        raw = await self.redis.get(self._key("owner", conversation))
        return _text(raw) if raw is not None else None

    # --- decisions ------------------------------------------------------------------------------
    async def plan_stop(self, conversation: Conversation, actor: str, is_moderator: IsModerator,
                        mention: Mention) -> StopPlan:
        """Typed ``stop``: the actor's own jobs in the conversation; a moderator's stops every job
        there; anyone else is told whose run it is."""
        active = await self.active(conversation)
        mine = [job_id for job_id, user in active.items() if user == actor]
        if mine:
            return StopPlan(mine)
        if not active:
            return StopPlan(refusal="Nothing is running here to stop.")
        if await is_moderator():
            return StopPlan(list(active))
        return StopPlan(refusal=not_yours("stop", sorted(set(active.values())), mention))

    async def check_reset(self, job: Job, is_moderator: IsModerator, mention: Mention) -> str | None:
        """Why ``job`` (a reset) may not go ahead, or None: only the conversation's owner or a
        moderator, and at most ``rate_reset_per_min`` a minute (the charge is taken here)."""
        owner = await self.owner(job.conversation)
        if owner is not None and owner != job.user and not await is_moderator():
            return not_yours("reset", [owner], mention)
        try:
            await self.limiter.take_reset(job)
        except RateLimited as exc:
            return exc.user_message()
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
