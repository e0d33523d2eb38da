"""The two scripts a job costs (besides its enqueue): begin and finish, against a real Redis."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from bot.core.jobs import Event
from bot.core.settings import Settings
from bot.queue.stream import Delivery, JobQueue
from tests.queue.test_queue import make_job


async def _two_jobs(queue: JobQueue, reply: str) -> tuple[Delivery, Delivery]:
    await queue.ensure_group()
    await queue.enqueue(make_job(key="a", text="first", reply=reply))
    await queue.enqueue(make_job(key="b", text="second", reply=reply))
    first, second = await queue.read("w", count=10, block_ms=100)
    return first, second


def _final(delivery: Delivery, text: str = "done") -> str:
    assert delivery.job is not None
    return Event(job_id=delivery.job.id, conversation=delivery.job.conversation, seq=9, type="final",
                 payload={"text": text}).dumps()


async def test_begin_waits_for_turn_then_locks_and_loads_state(redis_client: aioredis.Redis,
                                                               settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    first, second = await _two_jobs(queue, settings.key("r"))
    assert (await queue.begin(second, "t2", 5)).status == "wait"  # the first job has not finished
    begun = await queue.begin(first, "t1", 5)
    assert begun.status == "ok" and begun.state is None  # a new conversation has no state yet
    assert (await queue.begin(first, "other", 5)).status == "busy"  # a second delivery of the same job
    await queue.finish(first, [_final(first)], state_mode="set", state='{"jobs": 1}', token="t1")
    begun = await queue.begin(second, "t2", 5)
    assert begun.status == "ok" and json.loads(begun.state or "") == {"jobs": 1}


async def test_finish_publishes_in_order_acks_unlocks_and_is_idempotent(redis_client: aioredis.Redis,
                                                                        settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    reply = settings.key("r")
    first, second = await _two_jobs(queue, reply)
    assert (await queue.begin(first, "t1", 5)).status == "ok"
    assert (await queue.begin(second, "t2", 5)).status == "wait"  # asks for a wake-up
    events = ['{"n": 1}', '{"n": 2}', _final(first)]
    turn = redis_client.pubsub()
    await turn.subscribe(queue.turn_channel)
    await turn.get_message(timeout=1)  # the subscribe confirmation
    await queue.finish(first, events, state_mode="set", state="{}", token="t1")
    await queue.finish(first, events, state_mode="set", state="{}", token="t1")  # a retried call
    assert [f[b"event"].decode() for _, f in await redis_client.xrange(reply)] == events  # once, in order
    assert not await redis_client.exists(queue.conv_key(first.job.conversation, "lock"))  # type: ignore[union-attr]
    assert (await queue.depth())["pending"] == 1  # only the second job
    message = await turn.get_message(timeout=1)
    assert message is not None and message["data"].decode() == f"1:{first.job.conversation.key}"  # type: ignore[union-attr]
    await turn.aclose()


async def test_begin_acks_a_job_that_already_finished(redis_client: aioredis.Redis, settings: Settings) -> None:
    """A worker died after finish but before it saw the reply: the redelivery is only acked."""
    queue = JobQueue(redis_client, settings)
    first, _ = await _two_jobs(queue, settings.key("r"))
    assert (await queue.begin(first, "t1", 5)).status == "ok"
    await queue.finish(first, [_final(first)], token="t1")
    await redis_client.xclaim(queue.stream, "workers", "w", 0, [first.entry_id])  # pending again
    assert (await queue.begin(first, "t9", 5)).status == "done"
    assert (await queue.depth())["pending"] == 1
    assert await redis_client.xlen(settings.key("r")) == 1


async def test_finish_leaves_a_lock_it_does_not_hold(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    first, _ = await _two_jobs(queue, settings.key("r"))
    lock = queue.conv_key(first.job.conversation, "lock")  # type: ignore[union-attr]
    await redis_client.set(lock, "someone-else")
    await queue.finish(first, [_final(first)], token="mine")
    assert await redis_client.get(lock) == b"someone-else"
    assert await queue.renew_locks([(lock, "mine")], 5) == 0
    assert await queue.renew_locks([(lock, "someone-else")], 5) == 1
    assert not await queue.unlock(lock, "mine") and await queue.unlock(lock, "someone-else")


async def test_no_wakeup_is_published_when_no_job_asked(redis_client: aioredis.Redis, settings: Settings) -> None:
    """A later job that never found itself early (its worker runs the one before it, or it was not
    read yet) needs no message: the worker wakes it itself, or it will find its turn."""
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    await queue.enqueue(make_job(key="only", reply=settings.key("r")))
    await queue.enqueue(make_job(key="later", reply=settings.key("r")))
    [only, _] = await queue.read("w", count=2, block_ms=100)
    turn = redis_client.pubsub()
    await turn.subscribe(queue.turn_channel)
    await turn.get_message(timeout=1)
    assert (await queue.begin(only, "t", 5)).status == "ok"
    await queue.finish(only, [_final(only)], state_mode="del", token="t")
    assert await turn.get_message(timeout=0.2) is None
    await turn.aclose()


async def test_state_delete_on_reset(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    first, second = await _two_jobs(queue, settings.key("r"))
    await queue.begin(first, "t1", 5)
    await queue.finish(first, [_final(first)], state_mode="set", state='{"jobs": 1}', token="t1")
    await queue.begin(second, "t2", 5)
    await queue.finish(second, [_final(second)], state_mode="del", token="t2")
    assert not await redis_client.exists(queue.conv_key(second.job.conversation, "state"))  # type: ignore[union-attr]


async def test_concurrent_begins_share_one_round_trip(redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    for i in range(20):
        await queue.enqueue(make_job(conv=f"c{i}", key=f"k{i}", reply=settings.key("r")))
    deliveries = await queue.read("w", count=50, block_ms=100)
    before = queue.scripts.round_trips
    begun = await asyncio.gather(*(queue.begin(d, "t", 5) for d in deliveries))
    assert [b.status for b in begun] == ["ok"] * 20
    assert queue.scripts.round_trips - before == 1


def test_trim_history_keeps_the_newest_turns_from_a_user_turn() -> None:
    from bot.worker.store import trim_history

    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i:02d}" + "x" * 98}
               for i in range(10)]  # 10 messages of 100 characters
    kept = trim_history(history, 450)  # type: ignore[arg-type]
    assert [m["content"][:2] for m in kept] == ["06", "07", "08", "09"]
    assert trim_history(history, 10_000) == history  # type: ignore[arg-type]
    huge = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 5000}]
    assert trim_history(huge, 100) == huge  # type: ignore[arg-type]  # the newest user turn always stays


async def test_wakeups_continue_while_a_later_job_waits(redis_client: aioredis.Redis, settings: Settings) -> None:
    """Jobs 2 and 3 wait on other workers: finishing 1 wakes (2), finishing 2 wakes (3), then none."""
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    for key in "abc":
        await queue.enqueue(make_job(key=key, reply=settings.key("r")))
    first, second, third = await queue.read("w", count=3, block_ms=100)
    turn = redis_client.pubsub()
    await turn.subscribe(queue.turn_channel)
    await turn.get_message(timeout=1)
    assert (await queue.begin(first, "t1", 5)).status == "ok"
    assert (await queue.begin(second, "t2", 5)).status == "wait"
    assert (await queue.turn(third.job))[0] == 0  # type: ignore[arg-type]  # a poison-style wait marks it too
    for n, (delivery, token) in enumerate([(first, "t1"), (second, "t2"), (third, "t3")], start=1):
        if n > 1:
            assert (await queue.begin(delivery, token, 5)).status == "ok"
        await queue.finish(delivery, [_final(delivery)], token=token)
        message = await turn.get_message(timeout=0.3)
        if n < 3:
            assert message is not None and message["data"].decode().startswith(f"{n}:")
        else:
            assert message is None
    await turn.aclose()
