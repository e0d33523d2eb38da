"""A thread's turns never stall: the jobs stream is never trimmed under an unfinished job, a job
whose entry is gone is skipped with a notice to its user, and a turn that never comes ends in a
dead letter with the reason. Real Redis, real workers (no sandbox: the replies carry no code)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.bench.queue import NoopModel, NoSandbox
from bot.core.errors import JobLost
from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.stream import GROUP, JobQueue
from bot.worker.service import Worker
from tests.conftest import RunningWorkers


def job(thread: str, text: str, reply: str) -> Job:
    return Job(idempotency_key=f"{thread}-{text}", user="u", text=text, reply_stream=reply,
               conversation=Conversation(platform="test", channel="c", thread=thread))


@pytest.fixture
async def worker_on(model_server: Any) -> AsyncIterator[Callable[..., Any]]:
    """``await worker_on(settings, noop=False) -> Worker``: a real worker, no sandbox; the scripted
    model server (echoing ``done <text>``) or the in-process no-op model."""
    workers = RunningWorkers()
    model_server.script = lambda messages: f"done {messages[-1]['content']}"

    async def factory(settings: Settings, noop: bool = False) -> Worker:
        model = NoopModel() if noop else None
        settings = settings.model_copy(update={"llm_url": model_server.url})
        return await workers.start(Worker(settings, model=model, sandboxes=NoSandbox()),  # type: ignore[arg-type]
                                   within_s=30)

    yield factory
    await workers.stop()


async def terminals(redis: aioredis.Redis, stream: str, count: int, timeout: float = 60) -> dict[str, Event]:
    """Terminal events by job id, once ``count`` are there (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        events = [Event.loads(f[b"event"]) for _, f in await redis.xrange(stream)]
        done = {e.job_id: e for e in events if e.terminal}
        if len(done) >= count or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.05)


async def test_the_jobs_stream_keeps_every_unfinished_job_and_drops_finished_ones(
        worker_on: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    settings: Settings = make_settings(stream_maxlen=1000, rate_user_per_min=0, rate_channel_per_min=0)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    reply = settings.key("replies", "t")
    jobs = [job(f"t{i % 300}", f"q{i}", reply) for i in range(1500)]
    await queue.enqueue_many(jobs)
    # an approximate MAXLEN of 1,000 used to drop ~500 of these before any worker saw them
    assert await redis_client.xlen(queue.stream) == 1500
    await worker_on(settings, noop=True)
    threads = sorted({j.conversation for j in jobs}, key=lambda c: c.thread)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # every thread's five jobs done (the reply stream is capped at 1,000)
        counters = await redis_client.mget([queue.conv_key(c, "done") for c in threads])
        if all(c == b"5" for c in counters):
            break
        await asyncio.sleep(0.1)
    assert all(c == b"5" for c in counters)
    assert await redis_client.xlen(queue.stream) == 0  # each entry deleted with its ack
    assert await redis_client.exists(*(queue.conv_key(j.conversation, "q") for j in jobs[:300])) == 0


@pytest.mark.parametrize("where", ["before delivery", "pending at a dead worker"])
async def test_a_deleted_job_mid_thread_is_skipped_with_a_notice_and_the_thread_goes_on(
        where: str, worker_on: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    settings: Settings = make_settings(claim_idle_s=1.0)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    reply = settings.key("replies", "t")
    first, lost, third = (job("A", text, reply) for text in ("one", "two", "three"))
    for j in (first, lost, third):
        assert (await queue.enqueue(j)).created
    if where == "pending at a dead worker":
        held = await queue.read("ghost", count=2, block_ms=100)  # a worker that then died
        assert [d.job.id for d in held if d.job] == [first.id, lost.id]
    entries = await redis_client.xrange(queue.stream)
    await redis_client.xdel(queue.stream, entries[1][0])  # job "two" is gone, mid-thread
    await worker_on(settings)
    done = await terminals(redis_client, reply, 3, timeout=30)
    assert done[first.id].type == "final" and done[first.id].payload["text"] == "done one"
    assert done[third.id].type == "final" and done[third.id].payload["text"] == "done three"
    notice = done[lost.id]
    assert notice.type == "error" and notice.payload == {"kind": "lost", "message": JobLost.generic}
    assert "please send it again" in notice.payload["message"].lower()
    [(_, dead)] = await redis_client.xrange(queue.dead_stream)
    assert dead[b"job_id"].decode() == lost.id and b"entry is gone" in dead[b"reason"]
    assert await redis_client.xlen(queue.stream) == 0


async def test_a_turn_that_never_comes_ends_in_a_dead_letter_with_the_reason(
        worker_on: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    """Job one is held by a live consumer that never runs it (it keeps the entry fresh, so it is
    never reclaimed). Job two waits, then skips it once it neither ran nor finished for the limit."""
    settings: Settings = make_settings(claim_idle_s=1.0, turn_wait_s=1.0)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    reply = settings.key("replies", "t")
    stuck, waiting = job("B", "one", reply), job("B", "two", reply)
    await queue.enqueue(stuck)
    [held] = await queue.read("ghost", count=1, block_ms=100)
    await queue.enqueue(waiting)

    async def keep_fresh() -> None:
        while True:
            await queue.touch("ghost", [held.entry_id])
            await asyncio.sleep(0.1)

    toucher = asyncio.create_task(keep_fresh())
    try:
        await worker_on(settings)
        done = await terminals(redis_client, reply, 2, timeout=30)
    finally:
        toucher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await toucher
    assert done[waiting.id].type == "final" and done[waiting.id].payload["text"] == "done two"
    assert done[stuck.id].type == "error" and done[stuck.id].payload["kind"] == "lost"
    [(_, dead)] = await redis_client.xrange(queue.dead_stream)
    assert dead[b"job_id"].decode() == stuck.id and b"did not start within" in dead[b"reason"]
    # the consumer that held it, if it ever gets to it, finds it finished: nothing runs twice
    assert (await queue.begin(held, "late", 5)).status == "done"
    assert await redis_client.xpending(queue.stream, GROUP) == {"pending": 0, "min": None, "max": None,
                                                               "consumers": []}
