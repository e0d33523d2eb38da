"""Worker-level queue semantics with real processes: order per thread, reclaim after kill -9,
dead letters that don't stop the worker."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.stream import JobQueue
from tests.processes import worker_process


def job(thread: str, text: str, reply: str, key: str | None = None) -> Job:
    return Job(idempotency_key=key or f"{thread}-{text}", user="u", text=text, reply_stream=reply,
               conversation=Conversation(platform="test", channel="c", thread=thread))


async def finals(redis: aioredis.Redis, stream: str, count: int, timeout: float = 60) -> list[tuple[float, Event]]:
    deadline = time.monotonic() + timeout
    while True:
        entries = await redis.xrange(stream)
        events = [(int(eid.decode().split("-")[0]) / 1000, Event.loads(f[b"event"])) for eid, f in entries]
        done = [(t, e) for t, e in events if e.terminal]
        if len(done) >= count or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.05)


async def test_jobs_of_a_thread_run_in_order_while_threads_run_concurrently(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    seen: list[tuple[float, str]] = []

    def echo(messages: list[dict[str, Any]]) -> str:
        text = messages[-1]["content"]
        seen.append((time.time(), text))
        return f"done {text}"

    model_server.script = echo
    model_server.chunk_chars = 2
    model_server.chunk_delay_s = 0.05  # each reply takes ~0.3 s
    worker = await start_worker(worker_concurrency=4)
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    for text in ("A1", "A2", "A3"):
        await queue.enqueue(job("A", text, reply))
    await queue.enqueue(job("B", "B1", reply))
    done = await finals(redis_client, reply, 4)
    assert sorted(e.payload["text"] for _, e in done) == ["done A1", "done A2", "done A3", "done B1"]
    started = {text: t for t, text in seen}
    finished = {e.payload["text"].split()[1]: t for t, e in done}
    assert [text for _, text in seen if text.startswith("A")] == ["A1", "A2", "A3"]
    assert started["A2"] >= finished["A1"] - 0.002 and started["A3"] >= finished["A2"] - 0.002
    assert started["B1"] < finished["A1"]  # another thread did not wait for A


async def test_poison_entry_is_dead_lettered_and_worker_goes_on(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["fine"]
    worker = await start_worker()
    queue = JobQueue(redis_client, worker.settings)
    await redis_client.xadd(queue.stream, {"job": "{\"this is\": not json"})
    await redis_client.xadd(queue.stream, {"job": json.dumps({"schema_version": 7}), "seq": "1"})
    reply = worker.settings.key("replies", "t")
    await queue.enqueue(job("T", "after the poison", reply))
    [(_, final)] = await finals(redis_client, reply, 1)
    assert final.type == "final" and final.payload["text"] == "fine"
    dead = await redis_client.xrange(queue.dead_stream)
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert len(reasons) == 2 and all(r.startswith("malformed job") for r in reasons), reasons
    assert (await queue.depth())["pending"] == 0


async def test_killed_worker_job_is_finished_by_another_exactly_once(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, make_settings: Any,
        key_prefix: str) -> None:
    model_server.script = ["answer after a crash"]
    model_server.stall_s = 3.0  # the first worker is mid-generation when it dies
    settings: Settings = make_settings(llm_url=model_server.url, claim_idle_s=1.0)
    victim = await worker_process(settings, key_prefix)
    queue = JobQueue(redis_client, settings)
    reply = settings.key("replies", "t")
    try:
        await queue.ensure_group()
        await queue.enqueue(job("K", "survive", reply))
        for _ in range(200):  # wait until the victim holds the job and the model is generating
            if model_server.requests:
                break
            await asyncio.sleep(0.05)
        assert model_server.requests, "the first worker never picked the job up"
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
    finally:
        if victim.returncode is None:
            victim.kill()
    model_server.stall_s = 0.0
    await start_worker(claim_idle_s=1.0)
    done = await finals(redis_client, reply, 1, timeout=30)
    await asyncio.sleep(1.5)  # a second final, if any, would arrive now
    done = await finals(redis_client, reply, 1, timeout=0)
    assert len(done) == 1 and done[0][1].payload["text"] == "answer after a crash"
    assert (await queue.depth())["pending"] == 0
