"""Queue semantics against a real Redis: idempotency, order per thread, reclaim, dead letters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.stream import GROUP, JobQueue


def make_job(conv: str = "t1", key: str | None = None, text: str = "hi", reply: str = "replies") -> Job:
    job = Job(idempotency_key=key or f"evt-{text}-{conv}", conversation=Conversation(
        platform="test", workspace="w", channel="c", thread=conv), user="u", text=text, reply_stream=reply)
    return job


async def test_enqueue_is_idempotent_on_event_id(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    first = await queue.enqueue(make_job(key="Ev1"))
    again = await queue.enqueue(make_job(key="Ev1"))  # a retried delivery: new Job object, same event id
    other = await queue.enqueue(make_job(key="Ev2"))
    assert first.created and not again.created and other.created
    assert again.job_id == first.job_id
    assert await redis_client.xlen(queue.stream) == 2
    assert (first.seq, other.seq) == (1, 2)


async def test_seq_is_per_conversation(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    seqs = [(await queue.enqueue(make_job(conv=c, key=f"{c}{i}"))).seq for i in range(3) for c in ("a", "b")]
    assert seqs == [1, 1, 2, 2, 3, 3]


async def test_read_complete_acks_and_publishes_final(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    await queue.enqueue(make_job(reply=settings.key("r")))
    [delivery] = await queue.read("w1", count=10, block_ms=100)
    assert delivery.job is not None and delivery.job.seq == 1
    assert not await queue.is_done(delivery.job)
    final = Event(job_id=delivery.job.id, conversation=delivery.job.conversation, seq=1, type="final")
    await queue.complete(delivery, final)
    assert await queue.is_done(delivery.job)
    assert (await queue.depth())["pending"] == 0
    [(_, fields)] = await redis_client.xrange(settings.key("r"))
    assert json.loads(fields[b"event"])["type"] == "final"


async def test_dead_worker_entries_are_reclaimed(redis_client: aioredis.Redis,
                                                 make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(claim_idle_s=0.2)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    await queue.enqueue(make_job())
    [taken] = await queue.read("dead-worker", count=1, block_ms=100)
    assert await queue.reclaim("alive") == []  # not idle long enough yet
    await asyncio.sleep(0.3)
    [reclaimed] = await queue.reclaim("alive")
    assert reclaimed.entry_id == taken.entry_id and reclaimed.deliveries == 2
    assert reclaimed.job is not None and reclaimed.job.id == taken.job.id  # type: ignore[union-attr]


async def test_touch_keeps_a_live_workers_entries(redis_client: aioredis.Redis,
                                                  make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(claim_idle_s=0.3)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    await queue.enqueue(make_job())
    [taken] = await queue.read("busy", count=1, block_ms=100)
    for _ in range(3):
        await asyncio.sleep(0.15)
        await queue.touch("busy", [taken.entry_id])
    assert await queue.reclaim("thief") == []


@pytest.mark.parametrize("fields", [
    {"job": "{not json"},
    {"job": json.dumps({"schema_version": 99, "idempotency_key": "x"}), "seq": "1"},
    {"something": "else"},
])
async def test_poison_entries_parse_as_poison(redis_client: aioredis.Redis, settings: Settings,
                                              fields: dict[str, str]) -> None:
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    await redis_client.xadd(queue.stream, fields)
    [delivery] = await queue.read("w", count=1, block_ms=100)
    assert delivery.job is None and delivery.error
    await queue.dead_letter(delivery, delivery.error)
    [(_, dead)] = await redis_client.xrange(queue.dead_stream)
    assert dead[b"reason"].decode() == delivery.error
    assert (await redis_client.xpending(queue.stream, GROUP))["pending"] == 0


async def test_stop_job_is_published_not_queued(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(queue.cancel_channel)
    await pubsub.get_message(timeout=1)
    job = make_job(key="stop-1")
    job.kind = "stop"
    assert (await queue.enqueue(job)).created
    again = make_job(key="stop-1")  # the platform delivering the press again
    again.kind = "stop"
    assert not (await queue.enqueue(again)).created
    assert (await queue.enqueue(job)).created  # our own SET resent after a lost reply
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and message["data"].decode() == job.conversation.key
    assert await redis_client.exists(queue.stream) == 0
    await pubsub.aclose()


async def test_a_resent_enqueue_is_still_the_callers_own_job(redis_client: aioredis.Redis, settings: Settings) -> None:
    """redis-py resends a command whose reply was lost with the connection (a Redis restart): the
    second run of the script must still tell the adapter it created the job, or the adapter takes
    its own job for a platform retry and never renders it. A real retry (a new Job) is a duplicate."""
    queue = JobQueue(redis_client, settings)
    job = make_job(key="EvLost")
    first = await queue.enqueue(job)
    resent = await queue.enqueue(job)  # the same call again: same Job, same id
    retry = await queue.enqueue(make_job(key="EvLost"))  # the platform redelivering the event
    assert (first.created, resent.created, retry.created) == (True, True, False)
    assert first.job_id == resent.job_id == retry.job_id and first.seq == resent.seq == retry.seq == 1
    assert await redis_client.xlen(queue.stream) == 1
