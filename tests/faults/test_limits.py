"""Rate limits with a message the user can act on, and fairness: one heavy user cannot take every
slot of a worker from everyone else."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.jobs import Conversation, Event, Job
from bot.queue import JobQueue
from bot.ratelimit import RateLimited, RateLimiter

UNLIMITED = {"rate_user_per_min": 0, "rate_channel_per_min": 0}


def job(user: str, thread: str, reply: str, channel: str = "c", text: str = "hi") -> Job:
    return Job(idempotency_key=f"{user}-{channel}-{thread}-{text}", user=user, text=text, reply_stream=reply,
               conversation=Conversation(platform="test", channel=channel, thread=thread))


async def terminals(redis: aioredis.Redis, stream: str, count: int, timeout: float = 30) -> list[tuple[float, Event]]:
    """Terminal events with the time Redis stamped them (the entry id), once ``count`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        entries = await redis.xrange(stream)
        done = [(int(eid.split(b"-")[0]) / 1000, e) for eid, f in entries if (e := Event.loads(f[b"event"])).terminal]
        if len(done) >= count or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.02)


async def test_a_user_over_the_limit_is_told_when_to_retry_and_others_are_not_affected(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["done"]
    worker = await text_worker(make_settings(llm_url=model_server.url, rate_user_per_min=3, rate_channel_per_min=0))
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    for i in range(5):
        await queue.enqueue(job("flood", f"t{i}", reply))
    await queue.enqueue(job("calm", "t9", reply))
    done = {e.job_id: e for _, e in await terminals(redis_client, reply, 6)}
    errors = [e for e in done.values() if e.type == "error"]
    assert len(done) == 6 and len(errors) == 2
    for e in errors:
        assert e.payload["kind"] == "rate_limited"
        assert re.fullmatch(r"You're sending requests faster than 3 per minute; try again in \d+s\. "
                            r"This request was not run\.", e.payload["message"]), e.payload["message"]
        assert 0 < e.payload["retry_after_s"] <= 20  # one token of 3 a minute comes back within 20 s
    assert len(model_server.requests) == 4  # refused requests never reach the model


async def test_a_busy_channel_is_limited_as_a_whole(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["done"]
    worker = await text_worker(make_settings(llm_url=model_server.url, rate_user_per_min=0, rate_channel_per_min=4))
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    for i in range(6):
        await queue.enqueue(job(f"user{i}", f"t{i}", reply, channel="busy"))
    await queue.enqueue(job("user0", "q", reply, channel="quiet"))
    done = [e for _, e in await terminals(redis_client, reply, 7)]
    refused = [e for e in done if e.type == "error"]
    assert len(done) == 7 and len(refused) == 2
    assert all(e.payload["message"].startswith("This channel is sending requests faster than 4 per minute")
               for e in refused)
    assert all(e.conversation.channel == "busy" for e in refused)


async def test_buckets_refill_and_a_refusal_costs_nothing(make_settings: Any, redis_client: aioredis.Redis) -> None:
    # 60 a minute: a token a second, so the burst of 60 takes far less than one refill even on a busy machine
    limiter = RateLimiter(redis_client, make_settings(rate_user_per_min=60, rate_channel_per_min=0))
    j = job("u", "t", "r")
    for _ in range(60):  # the burst: a full bucket
        await limiter.take(j)
    with pytest.raises(RateLimited) as refused:
        await limiter.take(j)
    assert 0 < refused.value.retry_after_s <= 1.01
    await asyncio.sleep(refused.value.retry_after_s + 0.05)
    await limiter.take(j)

    # user allows 2, channel 1: the channel's refusal must not spend the user's second token
    limiter = RateLimiter(redis_client, make_settings(rate_user_per_min=2, rate_channel_per_min=1))
    await limiter.take(job("v", "a", "r", channel="c1"))
    with pytest.raises(RateLimited) as by_channel:
        await limiter.take(job("v", "b", "r", channel="c1"))
    assert by_channel.value.scope == "channel"
    await limiter.take(job("v", "c", "r", channel="c2"))
    with pytest.raises(RateLimited) as by_user:
        await limiter.take(job("v", "d", "r", channel="c3"))
    assert by_user.value.scope == "user" and 25 <= by_user.value.retry_after_s <= 30


async def test_one_heavy_user_cannot_starve_the_rest(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    started: dict[str, float] = {}

    def reply(messages: list[dict[str, Any]]) -> str:
        text = messages[-1]["content"]
        started[text] = time.time()
        return "x" * 50 if text.startswith("heavy") else "light done"  # 50 chunks: ~1.5 s of streaming

    model_server.script = reply
    model_server.chunk_chars = 1
    model_server.chunk_delay_s = 0.03
    worker = await text_worker(make_settings(llm_url=model_server.url, worker_concurrency=4,
                                             worker_user_concurrency=2, **UNLIMITED))
    queue = JobQueue(redis_client, worker.settings)
    stream = worker.settings.key("replies", "t")
    for i in range(12):
        await queue.enqueue(job("heavy", f"h{i}", stream, text=f"heavy {i}"))
    await asyncio.sleep(0.3)  # the heavy user's jobs are all picked up and running or parked
    t0 = time.time()
    await queue.enqueue(job("light", "l", stream, text="light"))
    done = await terminals(redis_client, stream, 13, timeout=60)
    light = [t for t, e in done if e.payload.get("text") == "light done"]
    assert light and light[0] - t0 < 1.0, f"the light user waited {light[0] - t0:.2f}s behind the heavy one"
    # never more than 2 of the heavy user's jobs ran at once
    ends = sorted(t for t, e in done if e.payload.get("text", "").startswith("x"))
    starts = sorted(t for text, t in started.items() if text.startswith("heavy"))
    assert len(starts) == len(ends) == 12
    overlap = max(sum(1 for s in starts if s <= t) - sum(1 for e in ends if e < t) for t in starts)
    assert overlap <= 2, f"{overlap} heavy jobs ran at once"
