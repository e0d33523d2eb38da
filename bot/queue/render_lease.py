"""Several adapter replicas on one reply stream: each job is rendered by one replica at a time, in order.

A plain consumer group (``bot.queue.replies``) hands a job's events to whichever replica reads
next, so two replicas would each fold half a job's stream into a message of their own. Here the
reply stream is only a way in: a replica *routes* what arrives, in one Lua script that reads the
group (``XREADGROUP`` inside the script, so routing is atomic and in stream order) and appends
each event to its job's own stream, acking and deleting it from the reply stream:

    render:lease:<job>   the replica rendering the job and until when (Redis's clock), renewed every
                         ``lease_s / 4``; an expired lease is anyone's, and still its holder's
                         until someone takes it
    render:q:<job>       the job's events not yet rendered, in order (the owner deletes what it
                         has shown, together with the state that shows it)
    render:state:<job>   what rebuilds the job's messages (the renderer's JSON: message ids,
                         text so far, last seq shown); a finished job's is a small tombstone
    render:jobs          sorted set job -> lease expiry (ms): how a live replica finds a job
                         whose owner died or stepped down

The first replica that routes an event of an unowned job (or posts its status message) takes the
lease. The owner reads its jobs' streams with one blocking XREAD (the reply stream in the same
call), so an event routed by another replica wakes it at once. Every ``lease_s / 4`` a replica
renews its leases and takes any job whose lease is gone (one script): a replica killed with -9 is
replaced after ``lease_s`` plus at most one tick; one that stops (SIGTERM) flushes, commits and
releases its jobs, and the others take them at their next tick. The new owner reads the state and
then the job's stream from its start — the events the dead one had not committed — so it goes on
editing the same messages; it drops events at or below the seq the state has shown.

Keys are built inside the scripts (one Redis, or one master behind Sentinel; not Redis Cluster).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot.core.jobs import Event
from bot.core.settings import Settings
from bot.queue.autopipe import AutoPipeline, LuaScript
from bot.queue.redis_conn import run_replicated_patiently
from bot.queue.replies import ORPHAN_CHECK_S, ORPHAN_IDLE_S, ensure_group, reply_stream

log = logging.getLogger(__name__)

#: a finished job's state: later events of it (a re-run's duplicates) are dropped
TOMBSTONE = b'{"done":1}'

# Every script starts with this: a lease is "<expiry ms>|<replica>" by Redis's own clock, kept
# (EX ttl) after it expires, so a replica whose lease ran out while nobody took it (a Redis outage
# longer than the lease) still finds it its own and carries on; anyone may take an expired one.
_LEASE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function holder(key, now)
  local v = redis.call('GET', key)
  if not v then return nil, false end
  local exp, who = string.match(v, '^(%d+)|(.*)$')
  return who, tonumber(exp) > now
end
local function grant(key, zset, job, me, now, lease_ms, ttl)
  redis.call('SET', key, (now + lease_ms) .. '|' .. me, 'EX', ttl)
  redis.call('ZADD', zset, now + lease_ms, job)
end
"""

# KEYS: reply stream, jobs zset   ARGV: group, me, lease ms, count, key prefix, ttl s, adopt ms
# -> flat list job, owner for each routed event (an unreadable entry is dropped: job '').
# adopt ms > 0: route entries pending that long instead of new ones (what a consumer of the plain
# ReplyReader, e.g. a replica of the previous version, left behind when it died)
_ROUTE = LuaScript(_LEASE + """
local entries = {}
if tonumber(ARGV[7]) > 0 then
  entries = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[7], '0-0', 'COUNT', ARGV[4])[2]
else
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[4], 'STREAMS', KEYS[1], '>')
  if r then entries = r[1][2] end
end
local now = now_ms()
local out = {}
for _, e in ipairs(entries) do
  local f, raw = e[2], nil
  for i = 1, #f, 2 do if f[i] == 'event' then raw = f[i + 1] end end
  local job = raw and string.match(raw, '^{"job_id":"([^"]+)"')
  if job then
    local q = ARGV[5] .. 'q:' .. job
    redis.call('XADD', q, '*', 'event', raw)
    redis.call('EXPIRE', q, ARGV[6])
    local lk = ARGV[5] .. 'lease:' .. job
    local who, live = holder(lk, now)
    if who ~= ARGV[2] and not live then
      who = ARGV[2]
      grant(lk, KEYS[2], job, who, now, tonumber(ARGV[3]), ARGV[6])
    end
    out[#out + 1] = job
    out[#out + 1] = who
  else
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
  redis.call('XACK', KEYS[1], ARGV[1], e[1])
  redis.call('XDEL', KEYS[1], e[1])
end
return out
""")

# KEYS: jobs zset   ARGV: me, lease ms, key prefix, max taken, ttl s, held jobs...
# -> '+job' for each job taken over, '-job' for each held job whose lease another replica has now
_TICK = LuaScript(_LEASE + """
local now = now_ms()
local lease_ms = tonumber(ARGV[2])
local out = {}
for i = 6, #ARGV do
  local lk = ARGV[3] .. 'lease:' .. ARGV[i]
  -- gone (nil) means released by another replica that had taken it: lost too
  if holder(lk, now) == ARGV[1] then
    grant(lk, KEYS[1], ARGV[i], ARGV[1], now, lease_ms, ARGV[5])
  else
    out[#out + 1] = '-' .. ARGV[i]
  end
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[4])
for _, job in ipairs(gone) do
  local lk = ARGV[3] .. 'lease:' .. job
  local who, live = holder(lk, now)
  if not live then
    grant(lk, KEYS[1], job, ARGV[1], now, lease_ms, ARGV[5])
    out[#out + 1] = '+' .. job
  end
end
return out
""")

# KEYS: lease, jobs zset   ARGV: me, lease ms, job, ttl s -> 1 when the lease is ours (taken or held)
_OWN = LuaScript(_LEASE + """
local now = now_ms()
local who, live = holder(KEYS[1], now)
if who == ARGV[1] or not live then
  grant(KEYS[1], KEYS[2], ARGV[3], ARGV[1], now, tonumber(ARGV[2]), ARGV[4])
  return 1
end
return 0
""")

# KEYS: lease, state, q   ARGV: me, state, ttl s, entry ids... -> 1, or 0 when another replica has the job
_COMMIT = LuaScript(_LEASE + """
if holder(KEYS[1], now_ms()) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
if #ARGV > 3 then redis.call('XDEL', KEYS[3], unpack(ARGV, 4)) end
return 1
""")

# KEYS: lease, state, q, jobs zset   ARGV: me, job, how, ttl s
# how: the tombstone (finished: the state becomes it, the job's stream goes); '' (stepping down:
# listed as leaseless, so a live replica takes it at its next tick); '-' (let go: unlisted, and the
# next event routed gives it to the router)
_RELEASE = LuaScript(_LEASE + """
if holder(KEYS[1], now_ms()) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] == '' then
  redis.call('ZADD', KEYS[4], 0, ARGV[2])
elseif ARGV[3] == '-' then
  redis.call('ZREM', KEYS[4], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[2])
end
return 1
""")

Deliver = Callable[[Event, str], Awaitable[None]]
ROUTE_BATCH = 64


class RenderLeases:
    """This replica's render leases on one adapter's reply stream."""

    #: jobs taken over per tick at most (the rest at the next one)
    TAKE_PER_TICK = 32

    def __init__(self, redis: aioredis.Redis, settings: Settings, adapter: str, replica: str | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.stream = reply_stream(settings, adapter)
        self.group = adapter
        # the pid alone could repeat: a container restarted in the same pod has the same host name and pid
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefix = settings.key("render", adapter, "")
        self.jobs_key = settings.key("render", adapter, "jobs")
        self.lease_ms = int(settings.render_lease_s * 1000)
        self.scripts = AutoPipeline(redis)
        #: job -> the id of the last entry of its stream handed to the renderer
        self.held: dict[str, str] = {}
        #: job -> when (monotonic) its last event was handed over; a held job silent for
        #: ``idle_s`` is let go (a job whose events never come must not be leased forever)
        self.active: dict[str, float] = {}
        self.idle_s = 3600.0
        #: told when a held job's lease turned out to be someone else's (this replica stalled)
        self.on_lost: Callable[[str], None] = lambda job: None

    def lease_key(self, job: str) -> str:
        return f"{self.prefix}lease:{job}"

    def queue_key(self, job: str) -> str:
        return f"{self.prefix}q:{job}"

    def state_key(self, job: str) -> str:
        return f"{self.prefix}state:{job}"

    def _hold(self, job: str) -> None:
        self.held.setdefault(job, "0-0")
        self.active[job] = time.monotonic()

    def _drop(self, job: str) -> None:
        self.held.pop(job, None)
        self.active.pop(job, None)

    async def ensure_group(self) -> None:
        await ensure_group(self.redis, self.stream, self.group)

    async def own(self, job: str) -> bool:
        """Take ``job``'s lease for this replica (True when it is ours: taken now, or already)."""
        ok = await self.scripts.run(_OWN, [self.lease_key(job), self.jobs_key],
                                    [self.replica, self.lease_ms, job, self.settings.idempotency_ttl_s])
        if ok:
            self._hold(job)
        return bool(ok)

    async def commit(self, job: str, entries: list[str], state: bytes | str) -> bool:
        """Store ``state`` and delete the ``entries`` it shows from the job's stream, if the job is
        still ours; False when it is not (the caller stops rendering it)."""
        ok = await self.scripts.run(_COMMIT, [self.lease_key(job), self.state_key(job), self.queue_key(job)],
                                    [self.replica, state, self.settings.idempotency_ttl_s, *entries])
        if not ok:
            self._drop(job)
        return bool(ok)

    async def finish(self, job: str) -> None:
        """The job is rendered to its end: its stream goes, a tombstone keeps later duplicates out."""
        self._drop(job)
        await self._release(job, TOMBSTONE)

    async def step_down(self, job: str) -> None:
        """Hand ``job`` over (after committing what was shown): a live replica takes it at its next tick."""
        self._drop(job)
        await self._release(job, b"")

    async def _release(self, job: str, tombstone: bytes) -> None:
        keys = [self.lease_key(job), self.state_key(job), self.queue_key(job), self.jobs_key]
        args = [self.replica, job, tombstone, self.settings.idempotency_ttl_s]
        if tombstone == TOMBSTONE and self.settings.redis_min_replicas:
            # On the replicas before we go on: a master that dies now cannot take the tombstone
            # with it, so a re-run of the job is not shown again after a failover. A second run of
            # the script writes nothing but the touch, which WAIT covers.
            await run_replicated_patiently(self.redis, self.settings, _RELEASE, keys, args, touch=keys[1],
                                           ttl_s=self.settings.idempotency_ttl_s, what=f"render tombstone of {job}")
            return
        await self.scripts.run(_RELEASE, keys, args)

    async def route(self, count: int = 64, adopt_idle_s: float = 0.0) -> int:
        """Move what arrived on the reply stream to its jobs' streams; returns entries routed.
        ``adopt_idle_s``: route instead what a plain reader left pending that long."""
        out = await self.scripts.run(_ROUTE, [self.stream, self.jobs_key],
                                     [self.group, self.replica, self.lease_ms, count, self.prefix,
                                      self.settings.idempotency_ttl_s, int(adopt_idle_s * 1000)])
        for i in range(0, len(out), 2):
            job, owner = _text(out[i]), _text(out[i + 1])
            if not job:
                log.error("unreadable reply entry dropped from %s", self.stream)
            elif owner == self.replica:
                self._hold(job)
        return len(out) // 2

    async def tick(self) -> None:
        """Renew this replica's leases; take the jobs whose owner is gone."""
        now = time.monotonic()
        for job in [j for j, t in self.active.items() if now - t > self.idle_s]:
            log.warning("job %s went quiet without a final event; letting its lease go", job)
            self._drop(job)
            await self._release(job, b"-")
        out = await self.scripts.run(_TICK, [self.jobs_key],
                                     [self.replica, self.lease_ms, self.prefix, self.TAKE_PER_TICK,
                                      self.settings.idempotency_ttl_s, *self.held])
        for item in map(_text, out):
            job = item[1:]
            if item.startswith("+"):
                log.info("took over rendering job %s", job)
                self._hold(job)
            elif job in self.held:
                log.warning("lost the render lease of job %s to another replica", job)
                self._drop(job)
                self.on_lost(job)


class LeasedReader:
    """Reads one adapter's reply stream for this replica: routes, renews, and hands each held
    job's events to ``deliver(event, entry_id)`` in order. The renderer commits what it has shown
    (``RenderLeases.commit``) and finishes or steps down each job itself."""

    def __init__(self, leases: RenderLeases, *, block_ms: int | None = None) -> None:
        self.leases = leases
        self.tick_s = leases.lease_ms / 4000
        self.block_ms = block_ms if block_ms is not None else max(10, int(self.tick_s * 1000))

    async def run(self, deliver: Deliver, stop: asyncio.Event) -> None:
        leases, redis = self.leases, self.leases.redis
        await leases.ensure_group()
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        next_adopt = loop.time() + ORPHAN_CHECK_S
        seen = "0-0"  # the reply stream: entries after this one are waiting to be routed
        route = True
        while not stop.is_set():
            try:
                if loop.time() >= next_tick:
                    next_tick = loop.time() + self.tick_s
                    await leases.tick()
                if loop.time() >= next_adopt:
                    next_adopt = loop.time() + ORPHAN_CHECK_S
                    await leases.route(adopt_idle_s=ORPHAN_IDLE_S)
                if route:
                    route = await leases.route(ROUTE_BATCH) >= ROUTE_BATCH  # more wait behind a full batch
                streams: dict[Any, Any] = {leases.stream: seen}
                streams.update((leases.queue_key(job), last) for job, last in leases.held.items())
                resp = await redis.xread(streams, count=64, block=None if route else self.block_ms)
            except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
                log.warning("reply reader lost Redis (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("the reply stream's group is gone (a Redis without its data); making it again")
                await leases.ensure_group()
                continue
            for key, entries in resp or []:
                name = _text(key)
                if name == leases.stream:
                    seen, route = _text(entries[-1][0]), True
                    continue
                job = name[len(leases.prefix) + 2:]
                for entry_id, fields in entries:
                    if job not in leases.held:
                        break  # finished or lost while we were reading
                    eid = _text(entry_id)
                    leases.held[job] = eid
                    leases.active[job] = time.monotonic()
                    raw = fields.get(b"event") or fields.get("event")
                    try:
                        event = Event.loads(raw)
                    except (ValueError, TypeError) as exc:
                        log.error("unreadable event of job %s dropped: %s", job, exc)
                        continue
                    await deliver(event, eid)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
