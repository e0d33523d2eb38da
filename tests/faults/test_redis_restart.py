"""Redis restarts (AOF on) while 1,000 jobs flow: none lost, none answered twice, and the worker,
the producer and the reply reader reconnect by themselves with backoff and say so in the log."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import pytest

from bot.core.jobs import Conversation, Event, Job
from bot.queue import redis_conn
from bot.queue.replies import ReplyReader
from bot.queue.stream import JobQueue
from tests.faults.conftest import RedisServer

JOBS = 1000
THREADS = 50


class RecordingReader(ReplyReader):
    """The adapter's reader, keeping every entry it reads by id (it deletes them once handled), so
    the test still sees what the workers published, a doubled final included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: dict[str, Event] = {}

    async def _handle(self, entry_id: bytes | str, fields: dict[bytes, bytes] | None, handler: Any) -> None:
        if fields and b"event" in fields:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            self.raw[eid] = Event.loads(fields[b"event"])
        await super()._handle(entry_id, fields, handler)

    def published(self) -> list[Event]:
        """Every entry read, in stream order."""
        return [self.raw[k] for k in sorted(self.raw, key=lambda e: tuple(int(p) for p in e.split("-")))]


def _echo(messages: list[dict[str, Any]]) -> str:
    return f"answer to {messages[-1]['content']}"


async def test_redis_restart_mid_flow_loses_and_doubles_nothing(
        redis_server: RedisServer, text_worker: Any, model_server: Any, make_settings: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    model_server.script = _echo
    settings = make_settings(redis_url=redis_server.url, llm_url=model_server.url, worker_concurrency=16,
                             claim_idle_s=2.0, rate_user_per_min=0, rate_channel_per_min=0,
                             worker_user_concurrency=16)
    await text_worker(settings)

    # the adapter's two halves: enqueue (as on a platform event) and render replies (deduplicated)
    producer = redis_conn.connect(settings)
    queue = JobQueue(producer, settings)
    reader = RecordingReader(redis_conn.connect(settings), settings, "t")
    rendered: list[Event] = []

    async def render(event: Event) -> None:
        rendered.append(event)

    stop_reading = asyncio.Event()
    reading = asyncio.create_task(reader.run(render, stop_reading, block_ms=200))
    job_ids: dict[str, str] = {}  # idempotency key -> job id
    order: dict[str, list[str]] = collections.defaultdict(list)  # thread -> job ids in enqueue order
    producer_retries = 0

    async def produce() -> None:
        nonlocal producer_retries
        for i in range(JOBS):
            thread = f"th{i % THREADS}"
            job = Job(idempotency_key=f"ev-{i}", user=f"u{i % 7}", text=f"question {i}",
                      reply_stream=reader.stream,
                      conversation=Conversation(platform="test", channel="c", thread=thread))
            while True:  # a platform redelivers an event it got no ack for: same event id
                try:
                    result = await queue.enqueue(job)
                    break
                except Exception:
                    producer_retries += 1
                    await asyncio.sleep(0.2)
            job_ids[job.idempotency_key] = result.job_id
            order[thread].append(result.job_id)
            await asyncio.sleep(0.004)  # ~5 s of steady traffic

    producing = asyncio.create_task(produce())
    while len(job_ids) < JOBS // 3:
        await asyncio.sleep(0.01)
    t_down = time.monotonic()
    await asyncio.to_thread(redis_server.stop)
    await asyncio.sleep(1.0)  # down long enough for every client to notice
    await asyncio.to_thread(redis_server.start)
    outage = time.monotonic() - t_down
    await asyncio.wait_for(producing, timeout=60)

    deadline = time.monotonic() + 45
    while sum(e.terminal for e in rendered) < JOBS and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a doubled final, if any, would be rendered by now
    stop_reading.set()
    await reading

    raw = reader.published()
    raw_finals = collections.Counter(e.job_id for e in raw if e.terminal)
    shown_finals = collections.Counter(e.job_id for e in rendered if e.terminal)
    ids = set(job_ids.values())
    assert len(ids) == JOBS, "an event id was enqueued as two jobs"
    lost = ids - set(raw_finals)
    assert not lost, f"{len(lost)} jobs never got a final event (outage {outage:.1f}s)"
    assert [j for j, n in raw_finals.items() if n > 1] == [], "a job published two finals"
    assert set(shown_finals) == ids and max(shown_finals.values()) == 1
    by_id = {e.job_id: e for e in raw if e.terminal}
    texts = {job_ids[k]: f"answer to question {k.split('-')[1]}" for k in job_ids}
    wrong = [j for j, e in by_id.items() if e.type != "final" or e.payload.get("text") != texts[j]]
    assert not wrong, f"{len(wrong)} jobs ended wrong, e.g. {by_id[wrong[0]].payload}"
    finished_order = [e.job_id for e in raw if e.terminal]
    for thread, expected in order.items():
        assert [j for j in finished_order if j in set(expected)] == expected, f"{thread} finished out of order"
    assert (await queue.depth())["pending"] == 0
    assert await producer.xlen(settings.key("dead")) == 0
    await producer.aclose()
    await reader.redis.aclose()

    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Redis connection lost") for m in lines), "no log line for the outage"
    assert any(m.startswith("Redis connection restored") for m in lines), "no log line for the recovery"
    print(f"outage {outage:.2f}s, producer-level retries {producer_retries}, "
          f"{len(raw) - len(rendered)} duplicate non-final events dropped by the reader")


async def test_a_retried_complete_publishes_one_final(redis_client: Any, make_settings: Any) -> None:
    """The restart case the big test can only hit by luck: the final-event script ran, its reply
    was lost with the connection, and the retry runs it again. The user must see one answer."""
    settings = make_settings()
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    reply = settings.key("replies", "t")
    await queue.enqueue(Job(idempotency_key="once", user="u", text="hi", reply_stream=reply,
                            conversation=Conversation(platform="test", channel="c", thread="t")))
    [delivery] = await queue.read("w", count=1, block_ms=100)
    assert delivery.job is not None
    final = Event(job_id=delivery.job.id, conversation=delivery.job.conversation, seq=1, type="final",
                  payload={"text": "the answer"})
    await queue.complete(delivery, final)
    await queue.complete(delivery, final)  # what redis-py's retry does after a lost reply
    assert [Event.loads(f[b"event"]).payload for _, f in await redis_client.xrange(reply)] == [{"text": "the answer"}]
    assert await queue.is_done(delivery.job) and (await queue.depth())["pending"] == 0
