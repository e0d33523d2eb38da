"""Stop: during generation and during a running cell, taking effect fast and leaving the thread usable."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import docker
import redis.asyncio as aioredis

from bot.core.jobs import Job
from bot.queue.stream import JobQueue
from tests.worker.test_service import finals, job


async def _cell_started(key_prefix: str) -> None:
    """Wait for the positive signal that the cell is past its first line: the file it writes first."""

    def probe() -> bool:
        client = docker.from_env()
        try:
            for container in client.containers.list(filters={"label": f"codeloop.test={key_prefix}"}):
                if container.exec_run(["test", "-e", "/tmp/started"]).exit_code == 0:
                    return True
            return False
        finally:
            client.close()

    for _ in range(600):
        if await asyncio.to_thread(probe):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the cell never started")


async def _stop(queue: JobQueue, j: Job) -> float:
    stop = j.model_copy(update={"kind": "stop", "idempotency_key": j.idempotency_key + "-stop"})
    t0 = time.monotonic()
    await queue.enqueue(stop)
    return t0


async def test_stop_during_a_cell_interrupts_it_and_the_session_survives(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, key_prefix: str) -> None:
    model_server.script = ["```python\nkeep = 'still here'\nopen('/tmp/started', 'w').close()\n"
                           "import time\nwhile True: time.sleep(0.05)\n```",
                           "```python\nprint(keep)\n```", "ok"]
    worker = await start_worker(sandbox_cell_timeout_s=60)
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    first = job("S", "loop forever", reply)
    await queue.enqueue(first)
    for _ in range(400):
        if any(b'"type":"code"' in f[b"event"] for _, f in await redis_client.xrange(reply)):
            break
        await asyncio.sleep(0.025)
    await _cell_started(key_prefix)
    t0 = await _stop(queue, first)
    [(_, final)] = await finals(redis_client, reply, 1, timeout=10)
    assert time.monotonic() - t0 < 5  # not the 60 s cell timeout (a figure, not a budget: see bench)
    assert final.type == "final" and final.payload["cancelled"] is True
    await queue.enqueue(job("S", "print it", reply))
    done = await finals(redis_client, reply, 2, timeout=30)
    assert done[-1][1].payload["text"] == "ok"
    outputs = [f[b"event"] for _, f in await redis_client.xrange(reply) if b'"type":"output"' in f[b"event"]]
    assert b"still here" in outputs[-1]


async def test_stop_during_generation(start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["word " * 400, "after stop"]
    model_server.chunk_chars = 5
    model_server.chunk_delay_s = 0.02  # ~8 s of streaming
    worker = await start_worker()
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    first = job("G", "talk a lot", reply)
    await queue.enqueue(first)
    for _ in range(400):
        if any(b'"type":"delta"' in f[b"event"] for _, f in await redis_client.xrange(reply)):
            break
        await asyncio.sleep(0.025)
    t0 = await _stop(queue, first)
    [(_, final)] = await finals(redis_client, reply, 1, timeout=10)
    assert time.monotonic() - t0 < 5  # the reply would stream for ~8 s without Stop
    assert final.payload["cancelled"] is True and final.payload["text"].startswith("word")
    model_server.chunk_delay_s = 0
    await queue.enqueue(job("G", "again", reply))
    done = await finals(redis_client, reply, 2, timeout=30)
    assert done[-1][1].payload["text"] == "after stop"
    roles = [m["role"] for m in model_server.requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]  # the cut reply was kept, turns alternate
