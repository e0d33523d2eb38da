"""A job's outgoing events: batched in the background, in order, kept through a Redis failure."""

from __future__ import annotations

import asyncio
import json
import socket

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bot.core.jobs import Conversation, Event
from bot.core.settings import Settings
from bot.queue.outbox import Outbox
from bot.queue.stream import JobQueue

CONV = Conversation(platform="test", channel="c", thread="t")


def event(n: int) -> Event:
    return Event(job_id="j", conversation=CONV, seq=n, type="delta", payload={"text": str(n)})


async def test_events_of_one_tick_go_with_the_final(redis_client: aioredis.Redis, settings: Settings) -> None:
    reply = settings.key("r")
    outbox = Outbox(JobQueue(redis_client, settings), reply)
    for n in (1, 2, 3):
        outbox.put(event(n))
    rest = await outbox.drain()  # the job ended before it waited on anything
    assert [json.loads(e)["seq"] for e in rest] == [1, 2, 3]
    assert await redis_client.xlen(reply) == 0


async def test_events_are_flushed_in_the_background_in_order(redis_client: aioredis.Redis,
                                                             settings: Settings) -> None:
    reply = settings.key("r")
    outbox = Outbox(JobQueue(redis_client, settings), reply)
    for n in range(1, 41):
        outbox.put(event(n))
        if n % 7 == 0:
            await asyncio.sleep(0)  # a job that waits now and then (a model streaming)
    await asyncio.sleep(0.05)
    rest = await outbox.drain()
    sent = [json.loads(f[b"event"])["seq"] for _, f in await redis_client.xrange(reply)]
    assert sent + [json.loads(e)["seq"] for e in rest] == list(range(1, 41))
    assert rest == []


async def test_a_failed_flush_keeps_the_events_for_the_finish(settings: Settings) -> None:
    with socket.socket() as s:  # a port nobody listens on: Redis "down"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = aioredis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.2)
    outbox = Outbox(JobQueue(dead, settings), settings.key("r"))
    outbox.put(event(1))
    outbox.put(event(2))
    await asyncio.sleep(0.3)  # the flush ran and failed
    outbox.put(event(3))
    rest = await outbox.drain()
    assert [json.loads(e)["seq"] for e in rest] == [1, 2, 3]
    await dead.aclose()
