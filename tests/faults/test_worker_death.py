"""kill -9 of a worker in the middle of a cell: another worker takes the job over, reattaches to
the thread's live sandbox (no second container, none left behind) and one final reaches the user."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import docker
import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.stream import JobQueue
from tests.processes import worker_process

CODE = """```python
import time
try:
    runs
except NameError:
    runs = 0
runs += 1
print("run", runs, flush=True)
time.sleep(4)
print("finished run", runs)
```"""


def script(messages: list[dict[str, Any]]) -> str:
    if messages[-1]["content"].startswith("Execution result"):
        return "The cell ran to the end."
    return CODE


def containers(key_prefix: str) -> list[Any]:
    client = docker.from_env()
    try:
        return client.containers.list(all=True, filters={"label": f"codeloop.test={key_prefix}"})
    finally:
        client.close()


async def reply_events(redis: aioredis.Redis, stream: str) -> list[Event]:
    return [Event.loads(f[b"event"]) for _, f in await redis.xrange(stream)]


async def test_worker_killed_mid_cell_job_reattaches_and_finishes_once(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, make_settings: Any,
        key_prefix: str) -> None:
    model_server.script = script
    settings: Settings = make_settings(llm_url=model_server.url, claim_idle_s=1.0)
    victim = await worker_process(settings, key_prefix, CODELOOP_SANDBOX_LABELS=f"codeloop.test={key_prefix}",
                                  CODELOOP_SANDBOX_CELL_TIMEOUT_S="20")
    queue = JobQueue(redis_client, settings)
    reply = settings.key("replies", "t")
    conversation = Conversation(platform="test", channel="c", thread="mid-cell")
    state_key = queue.conv_key(conversation, "state")
    try:
        await queue.ensure_group()
        await queue.enqueue(Job(idempotency_key="mid-cell-1", user="u", text="count and sleep", reply_stream=reply,
                                conversation=conversation))
        deadline = time.monotonic() + 60
        while not any(e.type == "code" for e in await reply_events(redis_client, reply)):
            assert time.monotonic() < deadline, "the first worker never reached the cell"
            assert victim.returncode is None, "the first worker exited"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # inside time.sleep(4) now
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
    finally:
        if victim.returncode is None:
            victim.kill()
    [sandbox] = containers(key_prefix)  # the thread's container outlives its worker ...
    saved = json.loads(await redis_client.get(state_key) or "{}")
    assert saved.get("session_id") == sandbox.id  # ... and the thread knows it before the cell ended

    await start_worker(claim_idle_s=1.0, sandbox_labels=[f"codeloop.test={key_prefix}"])
    deadline = time.monotonic() + 60
    while not any(e.terminal for e in await reply_events(redis_client, reply)):
        assert time.monotonic() < deadline, "no final after the takeover"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # a second final, if any, would arrive now
    events = await reply_events(redis_client, reply)
    finals = [e for e in events if e.terminal]
    assert len(finals) == 1 and finals[0].type == "final", finals
    assert finals[0].payload["text"] == "The cell ran to the end."
    outputs = [e.payload["text"] for e in events if e.type == "output"]
    # the same live session: the interrupted first run had already counted once
    assert len(outputs) == 1 and "run 2" in outputs[0] and "finished run 2" in outputs[0], outputs
    assert [c.id for c in containers(key_prefix)] == [sandbox.id]  # reattached: no second container
    assert json.loads(await redis_client.get(state_key) or "{}")["session_id"] == sandbox.id
    assert (await queue.depth())["pending"] == 0
