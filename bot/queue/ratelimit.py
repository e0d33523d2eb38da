"""Rate limits and fairness: who may start a job now, and how many of one user's jobs run at once.

Three controls, because they answer different abuses:

* Token buckets in Redis, one per user and one per channel. A bucket holds N tokens and refills
  at N per minute, so a user may burst N requests, then sustain N a minute. Both buckets of a job
  are checked and charged atomically across every worker: a request the channel refuses costs
  the user nothing. The clock is Redis's ``TIME``, so hosts with skewed clocks still agree.
* A per-user pending cap (``user_pending_max``): the user's jobs queued or running anywhere,
  kept as a sorted set of job ids with a lease each (``active:<platform>:<workspace>:<user>``);
  the queue's finish removes a job, the lease covers a finish that never comes.
* ``FairSlots``: the worker's slots, at most ``worker_user_concurrency`` per user, each free slot
  going to the waiting job whose user runs the fewest. Jobs over the cap wait without a slot.

The adapters check the first two when they enqueue (``Admission``: folded into the queue's
enqueue script, so a refused request costs one round trip and nothing else: no stream entry, no
status message, no model call). ``RateLimiter`` charges the buckets again in the worker only for
jobs that did not pass that check (the console, older adapters): a backstop, never a second
charge. A limit of 0 turns that control off (benchmarks, single-user deployments).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bot.core.errors import RateLimited, Refused, TooManyPending
from bot.core.jobs import Job
from bot.core.settings import Settings

__all__ = ["Admission", "FairSlots", "RateLimited", "RateLimiter", "user_key"]

#: one "slow down" notice per user per this many seconds; later refusals in the window are silent
NOTICE_WINDOW_S = 60

# Lua shared by the scripts that charge limits. ``take_buckets(keys, caps, t)`` charges one token
# to every bucket or to none, and returns the seconds to wait and the index of the bucket that
# refused (0 when charged). A missing key is a full bucket, so keys expire once they would be full.
BUCKETS_LUA = """
local function take_buckets(keys, caps, t)
  local left, wait, which = {}, 0, 0
  for i = 1, #keys do
    local cap = tonumber(caps[i])
    local rate = cap / 60.0
    local b = redis.call('HMGET', keys[i], 'tokens', 'ts')
    local have = tonumber(b[1]) or cap
    local ts = tonumber(b[2]) or t
    have = math.min(cap, have + math.max(0, t - ts) * rate)
    left[i] = have
    if have < 1 then
      local w = (1 - have) / rate
      if w > wait then wait, which = w, i end
    end
  end
  if which > 0 then return wait, which end
  for i = 1, #keys do
    redis.call('HSET', keys[i], 'tokens', tostring(left[i] - 1), 'ts', tostring(t))
    redis.call('EXPIRE', keys[i], 61)
  end
  return 0, 0
end
local function now_s()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1000000
end
"""

# ``admit(k, a)``: the pending cap, then the buckets, for the job whose admission keys start at
# KEYS[k] (active set, notice key, buckets...) and arguments at ARGV[a] (job id, pending cap,
# lease s, notice window s, bucket count, bucket caps...). nil when admitted (and charged), else
# {'refused', kind, seconds to wait (a string: Lua numbers reach Redis as integers), limit or
# bucket index, 1 if this refusal is the first of its window (the user is told; later ones are not)}.
ADMIT_LUA = BUCKETS_LUA + """
local function admit(k, a)
  local t = now_s()
  local active, notice, id = KEYS[k], KEYS[k + 1], ARGV[a]
  local cap, lease, window, n = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
  local function refuse(kind, wait, which)
    local first = redis.call('SET', notice, '1', 'NX', 'EX', window) and 1 or 0
    return {'refused', kind, tostring(wait), which, first}
  end
  if cap > 0 and not redis.call('ZSCORE', active, id) then
    redis.call('ZREMRANGEBYSCORE', active, '-inf', t)
    if redis.call('ZCARD', active) >= cap then return refuse('pending', 0, cap) end
  end
  local keys, caps = {}, {}
  for i = 1, n do
    keys[i] = KEYS[k + 1 + i]
    caps[i] = ARGV[a + 4 + i]
  end
  local wait, which = take_buckets(keys, caps, t)
  if which > 0 then return refuse('rate', wait, which) end
  if cap > 0 then
    redis.call('ZADD', active, t + lease, id)
    redis.call('EXPIRE', active, math.ceil(lease))
  end
  return nil
end
"""

# KEYS: bucket keys   ARGV: capacity per key   -> {allowed, seconds to wait, index of the bucket that refused}
_TAKE = BUCKETS_LUA + """
local wait, which = take_buckets(KEYS, ARGV, now_s())
if which > 0 then return {0, tostring(wait), which} end
return {1, '0', 0}
"""


@dataclass(frozen=True)
class _Bucket:
    scope: str
    key: str
    limit: int


def buckets(job: Job, settings: Settings) -> list[_Bucket]:
    """The token buckets a message of ``job``'s user in ``job``'s channel is charged to."""
    conv = job.conversation
    candidates = [
        _Bucket("user", settings.key("rate", "user", conv.platform, conv.workspace, job.user),
                settings.rate_user_per_min),
        _Bucket("channel", settings.key("rate", "channel", conv.platform, conv.workspace, conv.channel),
                settings.rate_channel_per_min),
    ]
    return [b for b in candidates if b.limit > 0]


def active_key(job: Job, settings: Settings) -> str:
    """The sorted set of the user's jobs queued or running (job id -> lease expiry)."""
    conv = job.conversation
    return settings.key("active", conv.platform, conv.workspace, job.user)


def pending_lease_s(settings: Settings) -> int:
    """How long a job counts against its user's pending cap if its finish never comes: every
    round using its whole model and cell timeouts, plus time queued."""
    return int((settings.max_rounds + 1) * (settings.llm_timeout_s + settings.sandbox_cell_timeout_s) + 600)


@dataclass(frozen=True)
class Refusal:
    """Why the queue turned a request away, and whether the user should be told (the first
    refusal of a notice window is; the rest are silent, so a flood gets one "slow down")."""

    error: Refused
    notify: bool

    @property
    def kind(self) -> str:
        return self.error.kind

    def user_message(self) -> str:
        return self.error.user_message()


class Admission:
    """The keys and arguments of ``ADMIT_LUA`` for one job, and the reading of its refusal."""

    def __init__(self, job: Job, settings: Settings) -> None:
        self.buckets = buckets(job, settings)
        self.cap = settings.user_pending_max
        self.keys = [active_key(job, settings),
                     settings.key("notice", job.conversation.platform, job.conversation.workspace, job.user),
                     *(b.key for b in self.buckets)]
        self.args: list[Any] = [job.id, self.cap, pending_lease_s(settings), NOTICE_WINDOW_S, len(self.buckets),
                                *(b.limit for b in self.buckets)]

    def refusal(self, reply: list[Any]) -> Refusal:
        kind, wait, which, first = (x.decode() if isinstance(x, bytes) else x for x in reply[1:5])
        error: Refused
        if kind == "pending":
            error = TooManyPending(int(which), retry_after_s=float(wait))
        else:
            bucket = self.buckets[int(which) - 1]
            error = RateLimited(bucket.scope, bucket.limit, float(wait))
        return Refusal(error, bool(int(first)))


class RateLimiter:
    """The worker's backstop: charges the buckets of a job that was not admitted at enqueue."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.settings = settings
        self._take = redis.register_script(_TAKE)

    async def take(self, job: Job) -> None:
        """Charge one request to the job's user and channel; ``RateLimited`` if either is empty."""
        await self._charge(buckets(job, self.settings))

    async def take_reset(self, job: Job) -> None:
        """Charge a reset to its user's reset bucket (``rate_reset_per_min``): each one destroys a
        container and the next message builds another, so a loop of resets is load on the host."""
        conv = job.conversation
        bucket = _Bucket("reset", self.settings.key("rate", "reset", conv.platform, conv.workspace, job.user),
                         self.settings.rate_reset_per_min)
        await self._charge([bucket] if bucket.limit > 0 else [])

    async def _charge(self, found: list[_Bucket]) -> None:
        if not found:
            return
        allowed, wait, which = await self._take(keys=[b.key for b in found], args=[b.limit for b in found])
        if not int(allowed):
            bucket = found[int(which) - 1]
            raise RateLimited(bucket.scope, bucket.limit, float(wait))


def user_key(job: Job) -> str:
    conv = job.conversation
    return f"{conv.platform}/{conv.workspace}/{job.user}"


class FairSlots:
    """The worker's job slots, handed out fairly. A job takes a slot only while its user holds
    fewer than ``per_user`` here, and the last ``HEADROOM`` of the slots only if its user has
    nothing running here; when a slot frees, it goes to the waiting job whose user has the fewest
    running (first come, first served among equals). So a quiet user's question finds a slot at
    once, or takes the next one to free, instead of queueing behind the backlog of users who
    already have jobs running. Users with nothing running or waiting are forgotten."""

    #: share of the slots kept for users with nothing running here
    HEADROOM = 0.25

    def __init__(self, total: int, per_user: int) -> None:
        self.total = total
        self.per_user = per_user
        self.reserve = int(total * self.HEADROOM)
        self.free = total
        self.running: dict[str, int] = {}
        self._waiters: list[tuple[int, str, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def capped(self) -> int:
        """Jobs waiting because their user is at its cap: the worker doesn't count them against
        intake, or one user's backlog would stop it reading anyone else's jobs."""
        return sum(1 for _, user, _ in self._waiters if self.running.get(user, 0) >= self.per_user)

    def _may_take(self, user: str) -> bool:
        running = self.running.get(user, 0)
        return running < self.per_user and self.free > (self.reserve if running else 0)

    @contextlib.asynccontextmanager
    async def hold(self, user: str) -> AsyncIterator[None]:
        if self._may_take(user):
            self._take(user)  # no waiter could take a free slot (``_dispatch`` ran), so none is passed over
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (next(self._order), user, future)
            self._waiters.append(entry)
            try:
                await future
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                elif future.done() and not future.cancelled():
                    self._give_back(user)  # granted as we were cancelled
                raise
        try:
            yield
        finally:
            self._give_back(user)

    def _take(self, user: str) -> None:
        self.free -= 1
        self.running[user] = self.running.get(user, 0) + 1

    def _give_back(self, user: str) -> None:
        self.free += 1
        left = self.running[user] - 1
        if left:
            self.running[user] = left
        else:
            del self.running[user]
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free > 0:
            eligible = [w for w in self._waiters if self._may_take(w[1])]
            if not eligible:
                return
            best = min(eligible, key=lambda w: (self.running.get(w[1], 0), w[0]))
            self._waiters.remove(best)
            self._take(best[1])
            best[2].set_result(None)
