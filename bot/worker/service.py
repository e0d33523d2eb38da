"""``codeloop worker``: consume jobs, run the agent, publish replies.

Many workers (on many hosts) share one consumer group. Each holds up to ``worker_concurrency``
running jobs, and at most one job per conversation in flight: a later job of a thread that has
one here is parked (a Delivery in memory, no task) until that one finishes, and parked jobs
don't count against intake, so one thread's backlog never keeps the worker from reading
everyone else's jobs. A heartbeat keeps held entries fresh and renews conversation locks;
entries of a dead worker are reclaimed after ``claim_idle_s`` and dead-lettered after
``max_deliveries``. While Redis is near its ``maxmemory`` (``bot.queue.blobs.MemoryGuard``) new jobs
end at once with a message. SIGTERM stops intake, lets running jobs finish for a grace period,
then releases the rest for another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import redis.asyncio as aioredis

from bot.core.jobs import Event
from bot.core.settings import Settings
from bot.llm import make_client
from bot.llm.base import ModelClient
from bot.llm.profiles import ModelProfiles
from bot.ops import metrics
from bot.queue import redis_conn
from bot.queue.blobs import BlobStore, MemoryGuard
from bot.queue.channel_config import ChannelConfigs
from bot.queue.ordering import Signals, StuckTurn
from bot.queue.ratelimit import FairSlots, RateLimiter, user_key
from bot.queue.stream import Delivery, JobQueue
from bot.worker.jobrun import JobRun
from bot.worker.store import ConversationStore

if TYPE_CHECKING:
    from runner.engines import Sandboxes

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 20.0
#: parked jobs (later jobs of threads with one in flight here) a worker holds before it stops
#: reading, per unit of intake: a memory bound only; the adapters' admission bounds each user
PARKED_PER_INTAKE = 16


def _make_sandboxes(settings: Settings) -> Sandboxes:
    from runner.config import SandboxConfig
    from runner.engines import make_sandboxes
    from runner.janitor import ReapPolicy

    # Every worker runs the host-side janitor (one per engine): sandboxes are reaped by the host,
    # not only by themselves. CODELOOP_SANDBOX_ENGINES lists several engines; else DOCKER_HOST.
    return make_sandboxes(settings, SandboxConfig.from_settings(settings), ReapPolicy.from_settings(settings))


class Worker:
    def __init__(self, settings: Settings, *, model: ModelClient | None = None,
                 sandboxes: Sandboxes | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis_conn.connect(settings)
        self.queue = JobQueue(self.redis, settings)
        self.store = ConversationStore(self.redis, settings)
        self.model = model
        self.sandboxes = sandboxes
        self.slots = FairSlots(settings.worker_concurrency, settings.worker_user_concurrency)
        self.limiter = RateLimiter(self.redis, settings)
        self.held: dict[str, JobRun | None] = {}  # entry id -> run (None while parked/waiting)
        self.running: dict[str, JobRun] = {}  # conversation key -> run
        #: conversation key -> seqs of its jobs this worker holds (read and not yet finished)
        self.inflight: defaultdict[str, set[int]] = defaultdict(set)
        #: conversation key -> (seq, delivery) of its later jobs, parked until the one in flight ends
        self.parked: dict[str, list[tuple[int, Delivery]]] = {}
        self.parked_count = 0
        self.blobs = BlobStore(self.redis, settings)
        self.memory = MemoryGuard(self.redis, settings.redis_shed_ratio)
        self.channels = ChannelConfigs(self.redis, settings)
        #: CODELOOP_MODEL_PROFILES' clients, made when a channel first uses one (set up in ``run``)
        self.profiles: ModelProfiles | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.locks: dict[str, tuple[str, str]] = {}  # entry id -> (conversation lock key, token)
        # A dead worker's lock must lapse by the time its entry is reclaimed, hence the min().
        self._lock_ttl = min(settings.lock_ttl_s, settings.claim_idle_s)
        # A dead worker's jobs come back after claim_idle_s (the reclaim loop runs every half of
        # it); a turn is given up on only well after that.
        self._turn_wait_s = max(settings.turn_wait_s, settings.claim_idle_s * 2)
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        #: called with each job's enqueue->pickup seconds (benchmarks)
        self.pickup_observer: Callable[[float], None] | None = None

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        await redis_conn.check(self.redis, self.settings)
        await self.queue.ensure_group()
        if self.model is None:
            self.model = make_client(self.settings)
        profiles = self.profiles = ModelProfiles(self.settings, self.model)
        if self.sandboxes is None:
            self.sandboxes = _make_sandboxes(self.settings)
        await self.sandboxes.start()
        signals = Signals(self.redis, self.queue, self._on_cancel)
        await signals.start()
        self.signals = signals
        await self.memory.check()
        background = [asyncio.create_task(c) for c in (self._heartbeat(), self._reclaim_loop(), self.memory.run())]
        async with aiohttp.ClientSession() as http:
            self.http = http
            log.info("worker %s ready (backend=%s, concurrency=%d)", self.name, self.settings.backend,
                     self.settings.worker_concurrency)
            self.ready.set()
            try:
                await self._intake()
            finally:
                await self._drain()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await signals.stop()
                await self.sandboxes.aclose()
                await profiles.aclose()
                await self.redis.delete(self.settings.key("workers", self.name))
                await self.redis.aclose()

    def stop(self) -> None:
        self.stopping.set()

    async def _intake(self) -> None:
        limit = self.settings.worker_concurrency * 4  # bound on jobs held while waiting their turn
        while not self.stopping.is_set():
            # Jobs parked behind their thread's job here, or on their user's cap, don't count, or one
            # user's backlog would stop intake for everyone; admission at enqueue bounds them, and the
            # hard cap bounds the rest (memory).
            free = min(limit - (len(self.held) - self.slots.capped - self.parked_count),
                       limit * PARKED_PER_INTAKE - len(self.held))
            if free <= 0:
                await asyncio.sleep(0.01)
                continue
            try:
                deliveries = await self.queue.read(self.name, count=min(free, 32), block_ms=500)
            except (aioredis.ConnectionError, OSError) as exc:
                log.warning("lost Redis (%s); reconnecting in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            for delivery in deliveries:
                self._spawn(delivery)

    async def _drain(self) -> None:
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=SHUTDOWN_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        left = list(self.held)
        with contextlib.suppress(Exception):
            await self.queue.release(self.name, left)
        if left:
            log.warning("released %d unfinished job(s) to other workers", len(left))

    # --- one delivery ---------------------------------------------------------------------
    def _spawn(self, delivery: Delivery) -> None:
        if delivery.job is not None and delivery.deliveries == 1:
            waited = max(0.0, time.time() - delivery.job.created_at)
            metrics.PICKUP_SECONDS.observe(waited)
            if self.pickup_observer is not None:
                self.pickup_observer(waited)
        self.held[delivery.entry_id] = None
        job = delivery.job or delivery.envelope
        if job is not None:
            key = job.conversation.key
            here = self.inflight.get(key)
            if here and min(here) < job.seq:
                # an earlier job of the thread is here: park this one until it ends (``_unpark``)
                bisect.insort(self.parked.setdefault(key, []), (job.seq, delivery), key=lambda p: p[0])
                self.parked_count += 1
                return
            self.inflight[key].add(job.seq)
        self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._handle(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _unpark(self, key: str) -> None:
        """The thread's job here ended: start its next parked one."""
        queue = self.parked.get(key)
        if not queue:
            return
        seq, delivery = queue.pop(0)
        if not queue:
            del self.parked[key]
        self.parked_count -= 1
        self.inflight[key].add(seq)
        self._start(delivery)

    async def _handle(self, delivery: Delivery) -> None:
        metrics.ACTIVE_JOBS.inc()
        try:
            await self._process(delivery)
            self.held.pop(delivery.entry_id, None)
        except asyncio.CancelledError:
            pass  # shutdown: stays in self.held so _drain releases it
        except Exception:
            log.exception("could not finish entry %s; it will be retried", delivery.entry_id)
            self.held.pop(delivery.entry_id, None)
        finally:
            metrics.ACTIVE_JOBS.dec()
            job = delivery.job or delivery.envelope
            if job is not None:
                key = job.conversation.key
                self.inflight[key].discard(job.seq)
                if not self.inflight[key]:
                    del self.inflight[key]
                    if not self.stopping.is_set():
                        self._unpark(key)

    async def _process(self, delivery: Delivery) -> None:
        job = delivery.job
        if job is None:
            metrics.DEAD_LETTERS.labels("poison").inc()
            notice = None
            if delivery.envelope is not None:  # it holds a place in its thread: tell the user, in turn
                await self.signals.wait_turn(delivery.envelope, self._turn_wait_s)
                notice = Event(job_id=delivery.envelope.id, conversation=delivery.envelope.conversation, seq=10_000,
                               type="error", meta=delivery.envelope.meta,
                               payload={"kind": "poison", "message": "This request could not be read "
                                        f"({delivery.error}), so it was not run. Please send it again."})
            await self.queue.dead_letter(delivery, delivery.error or "poison", notice)
            return
        if delivery.deliveries > self.settings.max_deliveries:
            metrics.DEAD_LETTERS.labels("deliveries").inc()
            final = Event(job_id=job.id, conversation=job.conversation, seq=10_000, type="error", meta=job.meta,
                          payload={"kind": "dead_letter", "message": "Sorry, this request failed repeatedly and "
                                   "was set aside. Please try again or rephrase it."})
            await self.queue.dead_letter(delivery, f"delivered {delivery.deliveries} times", final)
            return
        assert self.model is not None and self.sandboxes is not None
        run = JobRun(delivery, self.queue, self.store, self.model, self.sandboxes, self.settings, self.http,
                     blobs=self.blobs, memory=self.memory, profiles=self.profiles, channels=self.channels)
        if not await self._begin(run):
            return  # finished before a crash hid its ack; begin acked it
        try:
            if await run.admit(self.limiter, self.memory):
                async with self.slots.hold(user_key(job)):
                    self.held[delivery.entry_id] = run
                    self.running[job.conversation.key] = run
                    token = metrics.log_context.set({"job": job.id, "conversation": job.conversation.key})
                    try:
                        await run.execute()
                    finally:
                        metrics.log_context.reset(token)
                        self.running.pop(job.conversation.key, None)
        except BaseException:
            # Not finished (shutdown, or Redis gone at the finish): nothing runs it here any more, so
            # let the next delivery take the thread at once rather than after the lock's TTL.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.queue.unlock(*self.locks[delivery.entry_id]))
            raise
        finally:
            self.locks.pop(delivery.entry_id, None)
        self.signals.advance(job.conversation.key, job.seq)  # finish released the lock with the ack

    async def _begin(self, run: JobRun) -> bool:
        """Wait for the job's turn, then take its conversation's lock and state (one script a try).
        False when the job had already finished (its entry is acked now)."""
        job = run.job
        token = uuid.uuid4().hex
        with self.signals.waiter(job.conversation.key, job.seq) as wake:
            waits = 0
            if any(seq < job.seq for seq in self.inflight.get(job.conversation.key, ())):
                # An earlier job of the thread is here: its finish wakes this one (``advance``), so
                # don't ask Redis yet (nor have a wake-up published for it).
                await self.signals.sleep(wake)
            stuck = StuckTurn(self._turn_wait_s)
            while True:
                begin = await self.queue.begin(run.delivery, token, self._lock_ttl)
                if begin.status == "done":
                    return False
                if begin.status == "ok":
                    break
                if begin.status == "busy":  # held by a delivery whose worker died: wait for it to lapse
                    await asyncio.sleep(min(0.05, begin.value / 1000) if begin.value > 0 else 0.05)
                    continue
                if stuck.expired(begin.value, begin.lock_ms) and await self.queue.skip_stuck(
                        job, begin.value, stuck.waited_s):
                    continue
                await self.signals.sleep(wake, waits)
                waits += 1
        run.token = token
        run.state = self.store.decode(begin.state)
        self.locks[run.delivery.entry_id] = (self.queue.conv_key(job.conversation, "lock"), token)
        return True

    def _on_cancel(self, message: str) -> None:
        """A Stop: "job:<id>:<conversation key>" stops that job only; a bare conversation key
        (the console) stops whatever runs there."""
        job_id = None
        if message.startswith("job:"):
            job_id, _, message = message[4:].partition(":")
        run = self.running.get(message)
        if run is not None and job_id in (None, run.job.id):
            log.info("stop requested for %s (job %s)", message, run.job.id)
            asyncio.get_running_loop().create_task(run.stop())

    # --- background -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        period = min(self.settings.lock_ttl_s, self.settings.claim_idle_s) / 3
        while True:
            try:
                await self.redis.set(self.settings.key("workers", self.name), "1", ex=max(2, int(period * 3)))
                await self.queue.touch(self.name, list(self.held))
                await self.queue.renew_locks(list(self.locks.values()), self._lock_ttl)
                depth = await self.queue.depth()
                for state, value in depth.items():
                    metrics.QUEUE_DEPTH.labels(state).set(value)
            except (aioredis.ConnectionError, OSError) as exc:
                log.warning("heartbeat: Redis unavailable (%s)", exc)
            await asyncio.sleep(period)

    async def _reclaim_loop(self) -> None:
        period = max(0.2, self.settings.claim_idle_s / 2)
        while True:
            await asyncio.sleep(period)
            try:
                for delivery in await self.queue.reclaim(self.name):
                    if delivery.entry_id not in self.held:
                        log.info("reclaimed %s (delivery %d)", delivery.entry_id, delivery.deliveries)
                        self._spawn(delivery)
            except (aioredis.ConnectionError, OSError) as exc:
                log.warning("reclaim: Redis unavailable (%s)", exc)


async def any_worker_alive(redis: aioredis.Redis, settings: Settings) -> bool:
    async for _ in redis.scan_iter(match=settings.key("workers", "*"), count=100):
        return True
    return False


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, help="jobs at once (default CODELOOP_WORKER_CONCURRENCY)")


def main(args: argparse.Namespace) -> int:
    overrides = {"worker_concurrency": args.concurrency} if args.concurrency else {}
    settings = Settings.load(**overrides)
    metrics.setup_logging(settings)
    metrics.start_metrics_server(settings)

    async def serve() -> None:
        from bot.ops.metrics_server import PROBE, redis_check

        worker = Worker(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        ping, close_ping = redis_check(settings)

        async def ready() -> str:
            if not worker.ready.is_set():
                raise ConnectionError("starting (model client, sandboxes, consumer group)")
            return f"{len(worker.held)} job(s) held"

        # /healthz: started, Redis answers, the loop turns; /livez: the loop turns
        PROBE.watch({"redis": ping, "worker": ready})
        try:
            await worker.run()
        finally:
            PROBE.stop()
            await close_ping()

    asyncio.run(serve())
    return 0
