"""The job queue on Redis Streams: at-least-once, idempotent enqueue, ordered per conversation.

Keys (under the settings' prefix):
    jobs                      the stream; consumer group ``workers``. Never trimmed: a job's entry
                              is deleted when it is acknowledged, so the stream holds only jobs
                              not yet finished, and none of those is ever dropped to make room
    dead                      dead-letter stream (entry + reason)
    idem:<event id>           idempotency key -> job id (TTL)
    conv:<key>:seq            last sequence number handed out in a conversation
    conv:<key>:done           last sequence number finished in a conversation
    conv:<key>:lock           token of the delivery running the conversation's current job
    conv:<key>:waiting        highest seq found early by begin (finish publishes ``turn`` for it)
    conv:<key>:q              seq -> its entry id and what to tell its user if the entry is lost
    conv:<key>:state          the conversation's state (``bot.worker.store``)
    active:<user>, notice:<user>, rate:...   admission at enqueue (``bot.queue.ratelimit``)
    cancel (pub/sub)          Stop requests: a conversation key, or "job:<job id>:<conversation key>"
    cancelled:<job id>        a Stop for one job (TTL); a job found here when it begins is not run
    turn (pub/sub)            "<done>:<conversation key>": a conversation advanced its ``done`` counter

Ordering: enqueue assigns each job the next ``seq`` of its conversation atomically with the
XADD, so stream order and seq order agree. A worker runs job ``seq`` only once ``done ==
seq - 1`` (``bot.queue.ordering``). A turn never waits forever: a job whose predecessor's entry is
gone from the stream skips it (the predecessor's user is told to send it again, and it is
dead-lettered with the reason), and a predecessor that neither runs nor finishes for
``turn_wait_s`` is skipped the same way (``skip_stuck``).

Admission: the adapters enqueue with ``limits=True``, which checks the user's pending cap and the
rate buckets in the enqueue script itself (``bot.queue.ratelimit``): a refusal costs one round trip and
leaves no entry; the entry of an admitted job is marked so the worker doesn't charge it again.

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

from bot.core.errors import JobLost, PoisonJob
from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.autopipe import AutoPipeline, LuaScript
from bot.queue.ratelimit import ADMIT_LUA, Admission, Refusal, active_key
from bot.queue.redis_conn import claim_once, run_replicated

log = logging.getLogger(__name__)

GROUP = "workers"
_LOST_PAYLOAD = {"kind": JobLost.kind, "message": JobLost.generic}

# KEYS: idem, seq, done, stream, index, admission keys (bot.queue.ratelimit.Admission)...
# ARGV: job id, idem ttl, conv ttl, job json, lost record, mode ('' | charge | admitted), admission args...
# The idempotency key holds "<job id>:<seq>". Found with this call's own job id, it is this call
# run again (redis-py resends a command whose reply a Redis restart lost): still "created", or the
# adapter would take its own new job for a platform retry and never show it to the user. A
# duplicate is never charged; a refused job leaves nothing (not even its idempotency key).
_ENQUEUE = LuaScript(ADMIT_LUA + """
local existing = redis.call('GET', KEYS[1])
if existing then
  local id, seq = string.match(existing, '^([^:]*):?(%d*)$')
  return {id == ARGV[1] and 1 or 0, id, tonumber(seq) or 0}
end
if ARGV[6] == 'charge' then
  local refused = admit(6, 7)
  if refused then return refused end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. seq, 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
local eid
if ARGV[6] == '' then
  eid = redis.call('XADD', KEYS[4], '*', 'job', ARGV[4], 'seq', seq)
else
  eid = redis.call('XADD', KEYS[4], '*', 'job', ARGV[4], 'seq', seq, 'admitted', '1')
end
redis.call('HSET', KEYS[5], seq, eid .. '\\n' .. ARGV[5])
redis.call('EXPIRE', KEYS[5], ARGV[3])
return {1, ARGV[1], seq}
""")

# KEYS: admission keys   ARGV: admission args   -> nil, or a refusal (bot.queue.ratelimit.ADMIT_LUA)
_ADMIT = LuaScript(ADMIT_LUA + """
return admit(1, 1)
""")

# Skipping a turn that can never come. K = {done, index, stream, dead, waiting}, A = {group, conv
# ttl, turn channel, conversation key, maxlen}. ``rec`` is the job's line in the index: entry id,
# job id, its user's active set, its reply stream, and the error event that tells its user.
_SKIP_LUA = """
local function skip(K, A, seq, rec, reason)
  local eid, jid, active, reply, event
  if rec then
    eid, jid, active, reply, event = string.match(rec, '^([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)\\n(.*)$')
  end
  redis.call('SET', K[1], seq, 'EX', A[2])
  redis.call('HDEL', K[2], seq)
  if event then
    redis.call('XADD', reply, 'MAXLEN', '~', A[5], '*', 'event', event)
    if active ~= '' then redis.call('ZREM', active, jid) end
    redis.call('XACK', K[3], A[1], eid)
    redis.call('XDEL', K[3], eid)
  end
  redis.call('XADD', K[4], 'MAXLEN', '~', A[5], '*', 'reason', reason, 'conversation', A[4], 'seq', seq,
             'job_id', jid or '', 'entry_id', eid or '', 'dead_at', redis.call('TIME')[1])
  local waiting = tonumber(redis.call('GET', K[5]) or '0')
  if waiting > seq then redis.call('PUBLISH', A[3], seq .. ':' .. A[4]) end
  if waiting > 0 and waiting <= seq + 1 then redis.call('DEL', K[5]) end
end
-- The jobs at the head of the thread's line whose entries are gone: skipped, up to ``upto``.
local function skip_gone(K, A, done, upto)
  while done < upto do
    local rec = redis.call('HGET', K[2], done + 1)
    if not rec then return done end
    local eid = string.match(rec, '^([^\\n]*)')
    if #redis.call('XRANGE', K[3], eid, eid) > 0 then return done end
    done = done + 1
    skip(K, A, done, rec, 'its stream entry is gone (deleted or trimmed before it ran)')
  end
  return done
end
"""

# KEYS: done, lock, state, stream, waiting, index, dead
# ARGV: seq, lock token, lock ttl ms, group, entry id, conv ttl, turn channel, conversation key, maxlen
# One round trip to start a job: its turn, the conversation lock and the saved state.
#   {'done', done}         finished before a crash hid its ack: acked (and deleted) here, nothing to run
#   {'wait', done, pttl}   an earlier job of the conversation has not finished yet (pttl: its lock's,
#                          < 0 when nothing runs it); ``waiting`` now holds the highest seq waiting,
#                          so its finish publishes a wake-up. Earlier jobs whose entries are gone
#                          are skipped first (``skip_gone``).
#   {'busy', pttl}         another delivery of this conversation holds the lock (a worker that died)
#   {'ok', state}          the lock is ours; state is the conversation's JSON or nil
_BEGIN = LuaScript(_SKIP_LUA + """
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
if done >= seq then
  redis.call('XACK', KEYS[4], ARGV[4], ARGV[5])
  redis.call('XDEL', KEYS[4], ARGV[5])
  return {'done', done}
end
if done < seq - 1 then
  done = skip_gone({KEYS[1], KEYS[6], KEYS[4], KEYS[7], KEYS[5]}, {ARGV[4], ARGV[6], ARGV[7], ARGV[8], ARGV[9]},
                   done, seq - 1)
  if done < seq - 1 then
    if seq > tonumber(redis.call('GET', KEYS[5]) or '0') then redis.call('SET', KEYS[5], seq, 'EX', ARGV[6]) end
    return {'wait', done, redis.call('PTTL', KEYS[2])}
  end
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return {'busy', redis.call('PTTL', KEYS[2])} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {'ok', redis.call('GET', KEYS[3])}
""")

# KEYS: done, stream, reply, state, lock, waiting, index, active
# ARGV: seq, conv ttl, group, entry id, reply maxlen, turn channel, conversation key,
#       state mode (keep | set | del), state json, lock token, job id, events json...
# One round trip to end a job: its remaining events (the final last), the new state, the
# conversation's ``done`` counter, a wake-up for a later job, the ack, the entry's deletion, its
# user's pending slot and the lock's release.
_FINISH = LuaScript("""
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
-- done >= seq: this job's final is already out (a retried call whose first reply was lost in a
-- Redis restart, or a duplicate delivery); publishing again would show the user two answers.
if seq > done then
  for i = 12, #ARGV do
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
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[11])
local acked = redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[2], ARGV[4])
return acked
""")

# KEYS: done, waiting, index, stream, dead, lock   ARGV: seq, conv ttl, group, turn channel, conversation key, maxlen
# -> {done, lock pttl}; skips gone entries ahead of the job and marks it as waiting when it is early
_TURN = LuaScript(_SKIP_LUA + """
local seq = tonumber(ARGV[1])
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
if done < seq - 1 then
  done = skip_gone({KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[2]}, {ARGV[3], ARGV[2], ARGV[4], ARGV[5], ARGV[6]},
                   done, seq - 1)
end
if done < seq - 1 and seq > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], seq, 'EX', ARGV[2])
end
return {done, redis.call('PTTL', KEYS[6])}
""")

# KEYS: done, lock, index, stream, dead, waiting
# ARGV: done seen, conv ttl, group, turn channel, conversation key, maxlen, reason
# Skips job done+1 of the conversation if ``done`` has not moved and nothing holds the lock: the
# job a waiter has waited on for ``turn_wait_s``. 1 if it was skipped.
_SKIP_STUCK = LuaScript(_SKIP_LUA + """
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
if done ~= tonumber(ARGV[1]) or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
skip({KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, {ARGV[3], ARGV[2], ARGV[4], ARGV[5], ARGV[6]}, done + 1,
     redis.call('HGET', KEYS[3], done + 1), ARGV[7])
return 1
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
    """``created`` is False for a duplicate (the job id is the first one's) and for a refusal
    (``refused`` says why and whether to tell the user)."""

    job_id: str
    created: bool
    seq: int
    refused: Refusal | None = None


@dataclass
class Begin:
    """What ``JobQueue.begin`` found: ``status`` is done / wait / busy / ok; ``state`` is the
    conversation's saved JSON (ok only), ``value`` the done counter (wait) or lock's PTTL (busy);
    ``lock_ms`` (wait) the PTTL of the conversation's lock, negative when no job of it is running."""

    status: str
    state: str | None = None
    value: int = 0
    lock_ms: int = -2


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

    @property
    def admitted(self) -> bool:
        """Enqueued through the adapters' admission check (so already charged to its user)."""
        return self.fields.get("admitted") == "1"


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
    async def enqueue(self, job: Job, *, limits: bool = False, admitted: bool = False) -> EnqueueResult:
        """Add a job once per idempotency key; a Stop is sent straight to the running worker.

        ``limits``: check the user's pending cap and rate buckets first, in the same script (what
        the adapters do, before they post anything); a refusal comes back in ``refused`` and
        leaves no trace. ``admitted``: the caller already passed ``admit`` for this job. Either
        way the worker does not charge the job again. Only messages are limited."""
        idem = self.settings.key("idem", job.conversation.platform, job.idempotency_key)
        if job.kind == "stop":
            if not await claim_once(self.redis, idem, self.settings.idempotency_ttl_s, token=job.id):
                return EnqueueResult(job.id, False, 0)
            if job.target:
                await self.cancel_job(job.target, job.conversation)
            else:
                await self.cancel(job.conversation)
            return EnqueueResult(job.id, True, 0)
        admission = Admission(job, self.settings) if limits and not admitted and job.kind == "message" else None
        mode = "charge" if admission is not None else "admitted" if admitted or limits else ""
        keys, args = self._enqueue_call(job, idem, mode, admission)
        if self.settings.redis_min_replicas:  # on replicas before the platform's ack (docs/DEPLOY.md)
            reply = await run_replicated(self.redis, self.settings, _ENQUEUE, keys, args,
                                         touch=idem, ttl_s=self.settings.idempotency_ttl_s)
        else:
            reply = await self.scripts.run(_ENQUEUE, keys, args)
        if admission is not None and reply[0] in (b"refused", "refused"):
            return EnqueueResult(job.id, False, 0, admission.refusal(reply))
        return self._enqueue_result(reply)

    async def enqueue_many(self, jobs: list[Job], *, limits: bool = False) -> list[EnqueueResult]:
        """``enqueue`` for a burst; the enqueues share one round trip (``bot.queue.autopipe``)."""
        return list(await asyncio.gather(*(self.enqueue(job, limits=limits) for job in jobs)))

    async def admit(self, job: Job) -> Refusal | None:
        """The admission check alone, for an adapter that must post before it enqueues (Discord's
        status message id travels in the job): charges the job's user now; then enqueue it with
        ``admitted=True``, or ``release_admission`` it if it never is."""
        if job.kind != "message":
            return None
        admission = Admission(job, self.settings)
        reply = await self.scripts.run(_ADMIT, admission.keys, admission.args)
        return admission.refusal(reply) if reply else None

    async def release_admission(self, job: Job) -> None:
        """Give back the pending slot ``admit`` took for a job that was never enqueued."""
        await self.redis.zrem(active_key(job, self.settings), job.id)

    def _enqueue_call(self, job: Job, idem: str, mode: str = "",
                      admission: Admission | None = None) -> tuple[list[Any], list[Any]]:
        conv = job.conversation
        keys = [idem, self.conv_key(conv, "seq"), self.conv_key(conv, "done"), self.stream,
                self.conv_key(conv, "q"), *(admission.keys if admission else ())]
        args = [job.id, self.settings.idempotency_ttl_s, self.settings.conversation_ttl_s, job.dumps(),
                self._lost_record(job), mode, *(admission.args if admission else ())]
        return keys, args

    def _lost_record(self, job: Job) -> str:
        """What a waiter needs to skip this job if its entry is lost: its id, its user's pending
        set, its reply stream and the error event that tells its user (one line each, the event last)."""
        conv = job.conversation
        # json.dumps of the Event's fields: a pydantic Event costs ~3x as much, on every enqueue
        lost = json.dumps({"job_id": job.id, "conversation": {"platform": conv.platform, "workspace": conv.workspace,
                                                              "channel": conv.channel, "thread": conv.thread},
                           "seq": 10_000, "type": "error", "payload": _LOST_PAYLOAD, "meta": job.meta,
                           "ts": time.time()})
        head = (job.id, active_key(job, self.settings), job.reply_stream)
        return "\n".join([*(h.replace("\n", " ") for h in head), lost])

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
        if resp and len(resp) > 2 and resp[2]:
            # Redis 7 drops pending entries that were deleted from the stream and names them here; the
            # next job of their thread skips them (``skip_gone``) and their users are told.
            log.warning("%d pending job(s) were deleted from the stream before they finished", len(resp[2]))
        out = []
        for eid, fields in entries:
            if fields is None:  # deleted while pending (Redis before 7 reports them this way)
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

    async def turn(self, job: Job) -> tuple[int, int]:
        """The conversation's ``done`` counter (after skipping jobs ahead whose entries are gone)
        and its lock's PTTL; marks ``job`` as waiting (for a wake-up) if it is early."""
        conv = job.conversation
        done, lock_ms = await self.scripts.run(
            _TURN, [self.conv_key(conv, "done"), self.conv_key(conv, "waiting"), self.conv_key(conv, "q"),
                    self.stream, self.dead_stream, self.conv_key(conv, "lock")],
            [job.seq, self.settings.conversation_ttl_s, GROUP, self.turn_channel, conv.key,
             self.settings.stream_maxlen])
        return int(done), int(lock_ms)

    async def skip_stuck(self, job: Job, done: int, waited_s: float) -> bool:
        """Skip the job ``job`` has been waiting on (seq ``done + 1`` of its thread), if ``done``
        is still ``done`` and nothing runs it: dead-lettered with the reason, its user told."""
        conv = job.conversation
        reason = f"its turn came but it did not start within {waited_s:.0f} s; job {job.seq} of the thread went on"
        skipped = await self.scripts.run(
            _SKIP_STUCK, [self.conv_key(conv, "done"), self.conv_key(conv, "lock"), self.conv_key(conv, "q"),
                          self.stream, self.dead_stream, self.conv_key(conv, "waiting")],
            [done, self.settings.conversation_ttl_s, GROUP, self.turn_channel, conv.key,
             self.settings.stream_maxlen, reason])
        if skipped:
            log.warning("skipped job %d of %s: %s", done + 1, conv.key, reason)
        return bool(skipped)

    async def is_done(self, job: Job) -> bool:
        done = await self.redis.get(self.conv_key(job.conversation, "done"))
        return int(done or 0) >= job.seq

    async def begin(self, delivery: Delivery, token: str, lock_ttl_s: float) -> Begin:
        """Turn check + conversation lock + state load in one script (see ``_BEGIN``)."""
        job = delivery.job
        assert job is not None
        conv = job.conversation
        reply = await self.scripts.run(
            _BEGIN,
            [self.conv_key(conv, "done"), self.conv_key(conv, "lock"), self.conv_key(conv, "state"), self.stream,
             self.conv_key(conv, "waiting"), self.conv_key(conv, "q"), self.dead_stream],
            [job.seq, token, max(1, int(lock_ttl_s * 1000)), GROUP, delivery.entry_id,
             self.settings.conversation_ttl_s, self.turn_channel, conv.key, self.settings.stream_maxlen],
        )
        status, value = reply[0], reply[1]
        status = status.decode() if isinstance(status, bytes) else str(status)
        if status == "ok":
            return Begin(status, value.decode() if isinstance(value, bytes) else value)
        return Begin(status, value=int(value or 0), lock_ms=int(reply[2]) if len(reply) > 2 else -2)

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
             self.conv_key(conv, "lock"), self.conv_key(conv, "waiting"), self.conv_key(conv, "q"),
             active_key(job, self.settings)],
            [job.seq, self.settings.conversation_ttl_s, GROUP, delivery.entry_id, self.settings.stream_maxlen,
             self.turn_channel, conv.key, state_mode, state, token, job.id, *events],
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
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, delivery.entry_id)
                pipe.xdel(self.stream, delivery.entry_id)
                await pipe.execute()
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
