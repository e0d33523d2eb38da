"""The job queue on Redis Streams: at-least-once, idempotent enqueue, ordered per conversation.

Keys (under the settings' prefix):
    jobs                      the stream; consumer group ``workers``
    dead                      dead-letter stream (entry + reason)
    idem:<event id>           idempotency key -> job id (TTL)
    conv:<key>:seq            last sequence number handed out in a conversation
    conv:<key>:done           last sequence number finished in a conversation
    conv:<key>:lock           token of the delivery running the conversation's current job
    conv:<key>:waiting        highest seq found early by begin (finish publishes ``turn`` for it)
    conv:<key>:state          the conversation's state (``bot.store``)
    cancel (pub/sub)          Stop requests: a conversation key, or "job:<job id>:<conversation key>"
    cancelled:<job id>        a Stop for one job (TTL); a job found here when it begins is not run
    turn (pub/sub)            "<done>:<conversation key>": a conversation advanced its ``done`` counter

Ordering: enqueue assigns each job the next ``seq`` of its conversation atomically with the
XADD, so stream order and seq order agree. A worker runs job ``seq`` only once ``done ==
seq - 1`` (``bot.ordering``).

A job costs three round trips besides its share of XREADGROUP: the enqueue script, ``begin``
(turn check + conversation lock + state load, or an ack if it already finished) and ``finish``
(its unsent events + final + state + ``done`` + a wake-up for a later job + ack + unlock). A
redelivered job that already finished is only acked, and its final is never published twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot.autopipe import AutoPipeline, LuaScript
from bot.errors import PoisonJob
from bot.jobs import Conversation, Event, Job
from bot.redis_conn import claim_once, run_replicated
from bot.settings import Settings

log = logging.getLogger(__name__)

GROUP = "workers"

# KEYS: idem, seq, done, stream   ARGV: job id, idem ttl, conv ttl, job json, maxlen
# The idempotency key holds "<job id>:<seq>". Found with this call's own job id, it is this call
# run again (redis-py resends a command whose reply a Redis restart lost): still "created", or the
# adapter would take its own new job for a platform retry and never show it to the user.
_ENQUEUE = LuaScript("""
local existing = redis.call('GET', KEYS[1])
if existing then
  local id, seq = string.match(existing, '^([^:]*):?(%d*)$')
  return {id == ARGV[1] and 1 or 0, id, tonumber(seq) or 0}
end
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. seq, 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'job', ARGV[4], 'seq', seq)
return {1, ARGV[1], seq}
""")

# KEYS: done, lock, state, stream, waiting   ARGV: seq, lock token, lock ttl ms, group, entry id, conv ttl
# One round trip to start a job: its turn, the conversation lock and the saved state.
#   {'done', done}   finished before a crash hid its ack: acked here, nothing to run
#   {'wait', done}   an earlier job of the conversation has not finished yet; ``waiting`` now
#                    holds the highest seq waiting, so its finish publishes a wake-up
#   {'busy', pttl}   another delivery of this conversation holds the lock (a worker that died)
#   {'ok', state}    the lock is ours; state is the conversation's JSON or nil
_BEGIN = LuaScript("""
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
if done >= seq then
  redis.call('XACK', KEYS[4], ARGV[4], ARGV[5])
  return {'done', done}
end
if done < seq - 1 then
  if seq > tonumber(redis.call('GET', KEYS[5]) or '0') then redis.call('SET', KEYS[5], seq, 'EX', ARGV[6]) end
  return {'wait', done}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return {'busy', redis.call('PTTL', KEYS[2])} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {'ok', redis.call('GET', KEYS[3])}
""")

# KEYS: done, stream, reply, state, lock, waiting
# ARGV: seq, conv ttl, group, entry id, reply maxlen, turn channel, conversation key,
#       state mode (keep | set | del), state json, lock token, events json...
# One round trip to end a job: its remaining events (the final last), the new state, the
# conversation's ``done`` counter, a wake-up for a later job, the ack and the lock's release.
_FINISH = LuaScript("""
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
-- done >= seq: this job's final is already out (a retried call whose first reply was lost in a
-- Redis restart, or a duplicate delivery); publishing again would show the user two answers.
if seq > done then
  for i = 11, #ARGV do
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[i])
  end
  if ARGV[8] == 'set' then
    redis.call('SET', KEYS[4], ARGV[9], 'EX', ARGV[2])
  elseif ARGV[8] == 'del' then
    redis.call('DEL', KEYS[4])
  end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
-- Wake-ups only for jobs that asked (begin or wait_turn found them early); a worker wakes its
-- own next job without one. The mark stays while a later job than the next one waits.
local waiting = tonumber(redis.call('GET', KEYS[6]) or '0')
if waiting > seq then
  redis.call('PUBLISH', ARGV[6], ARGV[1] .. ':' .. ARGV[7])
end
if waiting > 0 and waiting <= seq + 1 then
  redis.call('DEL', KEYS[6])
end
if ARGV[10] ~= '' and redis.call('GET', KEYS[5]) == ARGV[10] then
  redis.call('DEL', KEYS[5])
end
return redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
""")

# KEYS: done, waiting   ARGV: seq, conv ttl   -> done; marks the job as waiting when it is early
_TURN = LuaScript("""
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
if done < tonumber(ARGV[1]) - 1 and tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
end
return done
""")

# KEYS: lock   ARGV: token   -> 1 if it was ours and is gone
_UNLOCK = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# KEYS: lock keys   ARGV: ttl ms, tokens (same order)   -> how many were still ours
_RENEW = LuaScript("""
local kept = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    kept = kept + 1
  end
end
return kept
""")


@dataclass
class EnqueueResult:
    job_id: str
    created: bool
    seq: int


@dataclass
class Begin:
    """What ``JobQueue.begin`` found: ``status`` is done / wait / busy / ok; ``state`` is the
    conversation's saved JSON (ok only), ``value`` the done counter (wait) or lock's PTTL (busy)."""

    status: str
    state: str | None = None
    value: int = 0


@dataclass
class Delivery:
    """One stream entry handed to this worker. ``job`` is None for poison entries; ``envelope``
    then holds what could still be read of it (conversation, seq, reply stream), so the user
    can be told and the conversation's later jobs are not left waiting for its turn forever."""

    entry_id: str
    fields: dict[str, str]
    job: Job | None
    deliveries: int = 1
    error: str | None = None
    envelope: Job | None = None


class JobQueue:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.stream = settings.key("jobs")
        self.dead_stream = settings.key("dead")
        self.cancel_channel = settings.key("cancel")
        self.turn_channel = settings.key("turn")
        #: every script call goes through here: the calls of one event-loop tick share a round trip
        self.scripts = AutoPipeline(redis)

    # --- keys ---------------------------------------------------------------------------------
    def conv_key(self, conversation: Conversation, name: str) -> str:
        return self.settings.key("conv", conversation.key, name)

    # --- adapters -----------------------------------------------------------------------------
    async def enqueue(self, job: Job) -> EnqueueResult:
        """Add a job once per idempotency key; a Stop is sent straight to the running worker."""
        idem = self.settings.key("idem", job.conversation.platform, job.idempotency_key)
        if job.kind == "stop":
            if not await claim_once(self.redis, idem, self.settings.idempotency_ttl_s, token=job.id):
                return EnqueueResult(job.id, False, 0)
            if job.target:
                await self.cancel_job(job.target, job.conversation)
            else:
                await self.cancel(job.conversation)
            return EnqueueResult(job.id, True, 0)
        keys, args = self._enqueue_call(job, idem)
        if self.settings.redis_min_replicas:  # on replicas before the platform's ack (docs/DEPLOY.md)
            return self._enqueue_result(await run_replicated(self.redis, self.settings, _ENQUEUE, keys, args,
                                                             touch=idem, ttl_s=self.settings.idempotency_ttl_s))
        return self._enqueue_result(await self.scripts.run(_ENQUEUE, keys, args))

    async def enqueue_many(self, jobs: list[Job]) -> list[EnqueueResult]:
        """``enqueue`` for a burst; the enqueues share one round trip (``bot.autopipe``)."""
        return list(await asyncio.gather(*(self.enqueue(job) for job in jobs)))

    def _enqueue_call(self, job: Job, idem: str) -> tuple[list[Any], list[Any]]:
        conv = job.conversation
        keys = [idem, self.conv_key(conv, "seq"), self.conv_key(conv, "done"), self.stream]
        args = [job.id, self.settings.idempotency_ttl_s, self.settings.conversation_ttl_s, job.dumps(),
                self.settings.stream_maxlen]
        return keys, args

    @staticmethod
    def _enqueue_result(reply: Any) -> EnqueueResult:
        created, job_id, seq = reply
        job_id = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
        return EnqueueResult(job_id, bool(created), int(seq))

    async def cancel(self, conversation: Conversation) -> None:
        """Stop whatever job runs in the conversation now (the console's Ctrl-C)."""
        await self.redis.publish(self.cancel_channel, conversation.key)

    # --- stopping one job (adapters' Stop: only that job, whoever else's runs in the thread) -----
    def cancelled_key(self, job_id: str) -> str:
        return self.settings.key("cancelled", job_id)

    async def cancel_job(self, job_id: str, conversation: Conversation) -> None:
        """Stop one job: marked first (a job that has not begun ends as stopped when its turn
        comes, ``is_cancelled``), then told to the worker running it, if one is."""
        await self.redis.set(self.cancelled_key(job_id), 1, ex=self.settings.idempotency_ttl_s)
        await self.redis.publish(self.cancel_channel, f"job:{job_id}:{conversation.key}")

    async def is_cancelled(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.cancelled_key(job_id)))

    # --- workers ------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        resp = await self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms)
        return [self._parse(eid, fields, 1) for _, entries in resp or [] for eid, fields in entries]

    async def reclaim(self, consumer: str, count: int = 50) -> list[Delivery]:
        """Take over entries idle longer than ``claim_idle_s`` (their worker died)."""
        min_idle = int(self.settings.claim_idle_s * 1000)
        resp = await self.redis.xautoclaim(self.stream, GROUP, consumer, min_idle, "0-0", count=count)
        entries = resp[1] if resp else []
        out = []
        for eid, fields in entries:
            if fields is None:  # trimmed away while pending
                await self.redis.xack(self.stream, GROUP, eid)
                continue
            info = await self.redis.xpending_range(self.stream, GROUP, min=eid, max=eid, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 1
            out.append(self._parse(eid, fields, deliveries))
        return out

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this worker is still working on (heartbeat)."""
        if entry_ids:
            await self.redis.xclaim(self.stream, GROUP, consumer, 0, entry_ids, justid=True)

    async def release(self, consumer: str, entry_ids: list[str]) -> None:
        """Give entries back at shutdown: mark them idle so the next reclaim takes them at once."""
        if entry_ids:
            idle = int(self.settings.claim_idle_s * 1000) + 1
            await self.redis.xclaim(self.stream, GROUP, consumer, 0, entry_ids, idle=idle, justid=True)

    async def turn(self, job: Job) -> int:
        """The conversation's ``done`` counter; marks ``job`` as waiting (for a wake-up) if it is early."""
        conv = job.conversation
        return int(await self.scripts.run(_TURN, [self.conv_key(conv, "done"), self.conv_key(conv, "waiting")],
                                          [job.seq, self.settings.conversation_ttl_s]))

    async def is_done(self, job: Job) -> bool:
        done = await self.redis.get(self.conv_key(job.conversation, "done"))
        return int(done or 0) >= job.seq

    async def begin(self, delivery: Delivery, token: str, lock_ttl_s: float) -> Begin:
        """Turn check + conversation lock + state load in one script (see ``_BEGIN``)."""
        job = delivery.job
        assert job is not None
        conv = job.conversation
        status, value = await self.scripts.run(
            _BEGIN,
            [self.conv_key(conv, "done"), self.conv_key(conv, "lock"), self.conv_key(conv, "state"), self.stream,
             self.conv_key(conv, "waiting")],
            [job.seq, token, max(1, int(lock_ttl_s * 1000)), GROUP, delivery.entry_id,
             self.settings.conversation_ttl_s],
        )
        status = status.decode() if isinstance(status, bytes) else str(status)
        if status == "ok":
            return Begin(status, value.decode() if isinstance(value, bytes) else value)
        return Begin(status, value=int(value or 0))

    async def finish(self, delivery: Delivery, events: list[str], *, state_mode: str = "keep", state: str = "",
                     token: str = "") -> None:
        """Publish the job's remaining events (terminal last), save or delete the conversation's
        state, advance its turn, ack, and release the lock — atomically, in one script."""
        job = delivery.job or delivery.envelope
        assert job is not None and state_mode in ("keep", "set", "del")
        conv = job.conversation
        await self.scripts.run(
            _FINISH,
            [self.conv_key(conv, "done"), self.stream, job.reply_stream, self.conv_key(conv, "state"),
             self.conv_key(conv, "lock"), self.conv_key(conv, "waiting")],
            [job.seq, self.settings.conversation_ttl_s, GROUP, delivery.entry_id, self.settings.stream_maxlen,
             self.turn_channel, conv.key, state_mode, state, token, *events],
        )

    async def complete(self, delivery: Delivery, final: Event | None) -> None:
        """Publish the terminal event, advance the conversation, and ack — in one script."""
        await self.finish(delivery, [final.dumps()] if final else [])

    async def renew_locks(self, locks: list[tuple[str, str]], ttl_s: float) -> int:
        """Extend conversation locks (key, token) still held by their token; returns how many were."""
        if not locks:
            return 0
        return int(await self.scripts.run(_RENEW, [k for k, _ in locks],
                                          [max(1, int(ttl_s * 1000)), *(t for _, t in locks)]))

    async def unlock(self, key: str, token: str) -> bool:
        """Release a conversation lock if ``token`` still holds it."""
        return bool(await self.scripts.run(_UNLOCK, [key], [token]))

    async def publish(self, reply_stream: str, event: Event) -> None:
        await self.publish_many(reply_stream, [event.dumps()])

    async def publish_many(self, reply_stream: str, events: list[str]) -> None:
        """Append events (JSON) to a reply stream in one round trip, in order."""
        if len(events) == 1:
            await self.redis.xadd(reply_stream, {"event": events[0]}, maxlen=self.settings.stream_maxlen,
                                  approximate=True)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for raw in events:
                pipe.xadd(reply_stream, {"event": raw}, maxlen=self.settings.stream_maxlen, approximate=True)
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, reason: str, final: Event | None = None) -> None:
        """Move an entry to the dead-letter stream with its reason; the user is told via ``final``."""
        record: dict[str, Any] = {**delivery.fields, "reason": reason, "entry_id": delivery.entry_id,
                                  "deliveries": delivery.deliveries, "dead_at": time.time()}
        await self.redis.xadd(self.dead_stream, {k: str(v) for k, v in record.items()},
                              maxlen=self.settings.stream_maxlen, approximate=True)
        if delivery.job is not None or delivery.envelope is not None:
            await self.complete(delivery, final)
        else:
            await self.redis.xack(self.stream, GROUP, delivery.entry_id)
        log.warning("dead-lettered %s: %s", delivery.entry_id, reason)

    async def depth(self) -> dict[str, int]:
        """Entries not yet delivered (lag) and delivered but unacked (pending)."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return {"lag": 0, "pending": 0}
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                return {"lag": int(g.get("lag") or 0), "pending": int(g["pending"])}
        return {"lag": 0, "pending": 0}

    # --- parsing ------------------------------------------------------------------------------
    @staticmethod
    def _parse(entry_id: Any, raw_fields: dict[Any, Any], deliveries: int) -> Delivery:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        fields = {
            (k.decode() if isinstance(k, bytes) else str(k)): (v.decode("utf-8", "replace") if isinstance(v, bytes)
                                                              else str(v))
            for k, v in raw_fields.items()
        }
        try:
            if "job" not in fields:
                raise PoisonJob("entry has no 'job' field")
            job = Job.loads(fields["job"])
            job.seq = int(fields.get("seq", "0"))
            if job.seq < 1:
                raise PoisonJob("entry has no valid 'seq' (not enqueued through JobQueue.enqueue)")
        except (PoisonJob, ValueError) as exc:
            return Delivery(eid, fields, None, deliveries, error=str(exc), envelope=_envelope(fields))
        return Delivery(eid, fields, job, deliveries)


def _envelope(fields: dict[str, str]) -> Job | None:
    """The routing part of an entry that is not a valid Job (a newer schema from an adapter that
    was upgraded first, text Python's json accepts but pydantic refuses), or None if even that is
    unreadable. Only entries with a seq from ``enqueue`` count: they hold a place in their thread."""
    try:
        raw = json.loads(fields.get("job", ""))
        seq = int(fields.get("seq", "0"))
        if not isinstance(raw, dict) or seq < 1:
            return None
        meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
        return Job.model_construct(id=str(raw.get("id") or uuid.uuid4().hex), seq=seq, meta=meta,
                                   conversation=Conversation.model_validate(raw["conversation"]),
                                   reply_stream=str(raw["reply_stream"]), user=str(raw.get("user", "")),
                                   idempotency_key=str(raw.get("idempotency_key", "")))
    except (ValueError, KeyError, TypeError):
        return None
