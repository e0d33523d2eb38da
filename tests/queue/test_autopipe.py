"""Auto-pipelined scripts: shared round trips, per-call errors, and scripts Redis forgot."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot.core.settings import Settings
from bot.queue.autopipe import AutoPipeline, LuaScript

INCR = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
FAIL = LuaScript("return redis.error_reply('nope: ' .. ARGV[1])")


async def test_calls_of_one_tick_share_a_round_trip(redis_client: aioredis.Redis, settings: Settings) -> None:
    pipe = AutoPipeline(redis_client)
    key = settings.key("n")
    await redis_client.script_load(INCR.source)  # cached, as after a worker's first job
    replies = await asyncio.gather(*(pipe.run(INCR, [key], [1]) for _ in range(50)))
    assert sorted(replies) == list(range(1, 51))
    assert (pipe.round_trips, pipe.calls) == (1, 50)
    assert await pipe.run(INCR, [key], [5]) == 55  # a lone call goes out on its own
    assert pipe.round_trips == 2


async def test_one_failing_call_fails_alone(redis_client: aioredis.Redis, settings: Settings) -> None:
    pipe = AutoPipeline(redis_client)
    ok, bad = await asyncio.gather(pipe.run(INCR, [settings.key("n")], [2]), pipe.run(FAIL, [], ["x"]),
                                   return_exceptions=True)
    assert ok == 2, str(ok)
    assert isinstance(bad, ResponseError) and "nope: x" in str(bad)


@pytest.mark.parametrize("calls", [1, 3])
async def test_scripts_are_reloaded_after_redis_forgot_them(redis_client: aioredis.Redis, settings: Settings,
                                                            calls: int) -> None:
    """A Redis restart empties its script cache; the call that meets NOSCRIPT loads and resends."""
    script = LuaScript(f"return {{'{settings.key_prefix}', ARGV[1]}}")  # unique: not cached by another test
    pipe = AutoPipeline(redis_client)
    replies = await asyncio.gather(*(pipe.run(script, [], [i]) for i in range(calls)))
    assert [r[1] for r in replies] == [str(i).encode() for i in range(calls)]
    await redis_client.script_flush()
    again = await asyncio.gather(*(pipe.run(script, [], [i]) for i in range(calls)))
    assert again == replies


async def test_a_burst_of_enqueues_is_one_round_trip_and_keeps_idempotency_and_order(
        redis_client: aioredis.Redis, settings: Settings) -> None:
    """What the Slack adapter relies on when 100 events are acked at once."""
    from bot.core.jobs import Conversation, Job
    from bot.queue.stream import JobQueue

    queue = JobQueue(redis_client, settings)

    def job(i: int, key: str | None = None) -> Job:
        return Job(idempotency_key=key or f"ev{i}", user="u", text=str(i), reply_stream="r",
                   conversation=Conversation(platform="t", channel="c", thread=str(i % 3)))

    await queue.enqueue(job(1000))  # the enqueue script is cached from here on
    before = queue.scripts.round_trips
    results = await asyncio.gather(*(queue.enqueue(job(i)) for i in range(30)), queue.enqueue(job(99, "ev0")))
    assert queue.scripts.round_trips - before == 1
    assert [r.created for r in results] == [True] * 30 + [False]
    assert results[30].job_id == results[0].job_id
    assert [r.seq for r in results[:9:3]] == [1, 2, 3]  # per-conversation order follows submission order
    assert await redis_client.xlen(settings.key("jobs")) == 31


async def test_a_dead_redis_fails_every_caller_of_the_batch(settings: Settings) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    dead = aioredis.Redis(port=1, retry=Retry(NoBackoff(), 0))  # nothing listens on port 1
    pipe = AutoPipeline(dead)
    results = await asyncio.gather(*(pipe.run(INCR, ["k"], [1]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, aioredis.ConnectionError | OSError) for r in results), results
    await dead.aclose()
