"""A Stop names one job: through a real worker and real Redis, stopping a queued job ends it before
it runs and leaves the job running in the same thread (someone else's) alone; stopping the
running one by its id stops it."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Job
from bot.queue.stream import JobQueue
from tests.faults.test_limits import UNLIMITED, terminals


def job(user: str, text: str, reply: str, **extra: Any) -> Job:
    return Job(idempotency_key=f"{user}-{text}", user=user, text=text, reply_stream=reply,
               conversation=Conversation(platform="test", channel="c", thread="shared"), **extra)


def stop(target: Job, by: str) -> Job:
    return job(by, f"stop {target.id}", target.reply_stream, kind="stop", target=target.id)


async def test_stopping_a_queued_job_leaves_the_running_one_alone(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = lambda messages: f"echo: {messages[-1]['content']} " + "word " * 40
    model_server.chunk_chars, model_server.chunk_delay_s = 4, 0.05  # ~2.5 s of streaming for A
    worker = await text_worker(make_settings(llm_url=model_server.url, **UNLIMITED))
    queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")
    a, b = job("alice", "first", reply), job("bob", "second", reply)
    await queue.enqueue(a)
    await queue.enqueue(b)  # waits for A's turn to end
    while not model_server.requests:  # until A is being answered
        await asyncio.sleep(0.02)
    await queue.enqueue(stop(b, "bob"))
    done = {e.job_id: e for _, e in await terminals(queue.redis, reply, 2)}
    assert done[a.id].type == "final" and done[a.id].payload["ok"] is True  # A ran to its end
    assert done[a.id].payload["text"].startswith("echo: first")
    assert done[b.id].payload == {"text": "", "cancelled": True, "ok": False, "rounds": 0}
    assert [r["messages"][-1]["content"] for r in model_server.requests] == ["first"]  # B never ran


async def test_stopping_the_running_job_by_its_id_stops_it(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["word " * 400, "after stop"]
    model_server.chunk_chars, model_server.chunk_delay_s = 5, 0.02  # ~8 s of streaming
    worker = await text_worker(make_settings(llm_url=model_server.url, **UNLIMITED))
    queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")
    a = job("alice", "talk", reply)
    await queue.enqueue(a)
    while not any(b'"type":"delta"' in f[b"event"] for _, f in await queue.redis.xrange(reply)):
        await asyncio.sleep(0.02)
    await queue.enqueue(stop(job("x", "other", reply), "alice"))  # a Stop for another job: nothing here
    await queue.enqueue(stop(a, "alice"))
    [(_, final)] = await terminals(queue.redis, reply, 1)
    assert final.job_id == a.id and final.payload["cancelled"] is True and final.payload["text"].startswith("word")
