"""Rate limits with a message the user can act on, checked when the adapters enqueue (before they
post anything) with the worker as a backstop, and fairness: one heavy user cannot take every slot
of a worker from everyone else, and one thread's backlog never keeps a worker from other threads."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.core.errors import TooManyPending
from bot.core.jobs import Conversation, Event, Job
from bot.queue.ratelimit import FairSlots, RateLimited, RateLimiter
from bot.queue.stream import JobQueue
from tests.adapters.discord.conftest import discord_settings, fake_discord, make_bot  # noqa: F401  (fixtures)
from tests.adapters.discord.rig import ALICE, next_job
from tests.adapters.slack.conftest import (  # noqa: F401  (the Slack rig's fixtures, used by name)
    event_body,
    fake_slack,
    make_rig,
    mention,
    slack_settings,
)

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
    heavy_ends = sorted(t for t, e in done if e.payload.get("text", "").startswith("x"))
    # two heavy jobs run at a time: the light one is done before the third of them ends
    assert light and light[0] <= heavy_ends[2], f"the light user waited {light[0] - t0:.2f}s behind the heavy one"
    # never more than 2 of the heavy user's jobs ran at once
    ends = sorted(t for t, e in done if e.payload.get("text", "").startswith("x"))
    starts = sorted(t for text, t in started.items() if text.startswith("heavy"))
    assert len(starts) == len(ends) == 12
    overlap = max(sum(1 for s in starts if s <= t) - sum(1 for e in ends if e < t) for t in starts)
    assert overlap <= 2, f"{overlap} heavy jobs ran at once"


async def test_a_quiet_user_is_answered_while_another_floods_one_thread(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    """A dozen slow jobs in one thread hold one job in flight; the rest are parked outside the
    worker's intake, so a question from someone else is read and answered at once, not after the
    flood's backlog has drained through the intake cap."""
    started: dict[str, float] = {}

    def reply(messages: list[dict[str, Any]]) -> str:
        text = messages[-1]["content"]
        started[text] = time.time()
        return "y" * 30 if text.startswith("flood") else "quiet done"  # 30 chunks: ~1 s of streaming

    model_server.script = reply
    model_server.chunk_chars = 1
    model_server.chunk_delay_s = 0.03
    worker = await text_worker(make_settings(llm_url=model_server.url, worker_concurrency=2, **UNLIMITED))
    queue = JobQueue(redis_client, worker.settings)
    stream = worker.settings.key("replies", "t")
    for i in range(12):
        await queue.enqueue(job("flooder", "one-thread", stream, text=f"flood {i}"))
    await queue.enqueue(job("quiet", "elsewhere", stream, channel="other", text="quiet"))
    done = await terminals(redis_client, stream, 3, timeout=60)
    quiet = [t for t, e in done if e.payload.get("text") == "quiet done"]
    assert quiet, [e.payload.get("text") for _, e in done]
    # the flood's third job starts only after its second has finished: the quiet answer came before
    deadline = time.monotonic() + 60
    while "flood 2" not in started and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "flood 2" in started and quiet[0] <= started["flood 2"], "the quiet user waited behind the flood"


async def test_limits_are_checked_at_enqueue_once_and_the_worker_does_not_charge_again(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["done"]
    worker = await text_worker(make_settings(llm_url=model_server.url, rate_user_per_min=3, rate_channel_per_min=0))
    queue = JobQueue(redis_client, worker.settings)
    stream = worker.settings.key("replies", "t")
    results = [await queue.enqueue(job("flood", f"t{i}", stream), limits=True) for i in range(5)]
    assert [r.created for r in results] == [True, True, True, False, False]
    refused = [r.refused for r in results[3:]]
    assert all(isinstance(r.error, RateLimited) for r in refused if r)
    assert [r.notify for r in refused if r] == [True, False]  # one "slow down" per window
    assert refused[0] and refused[0].user_message().startswith("You're sending requests faster than 3 per minute")
    # a refusal leaves nothing: no entry, no idempotency key (a platform retry is judged afresh)
    assert not await redis_client.exists(worker.settings.key("idem", "test", "flood-c-t3-hi"))
    done = [e for _, e in await terminals(redis_client, stream, 3)]
    assert [e.type for e in done] == ["final"] * 3  # admitted jobs are not charged a second time
    assert len(model_server.requests) == 3


async def test_a_users_pending_cap_is_checked_at_enqueue_and_freed_by_the_finish(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["done"]
    settings = make_settings(llm_url=model_server.url, user_pending_max=2, **UNLIMITED)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    stream = settings.key("replies", "t")
    first, second, third = [await queue.enqueue(job("u", f"t{i}", stream), limits=True) for i in range(3)]
    assert first.created and second.created and not third.created
    assert third.refused and isinstance(third.refused.error, TooManyPending) and third.refused.notify
    assert "2 requests waiting or running" in third.refused.user_message()
    await text_worker(settings)
    await terminals(redis_client, stream, 2)
    assert (await queue.enqueue(job("u", "t9", stream), limits=True)).created  # the finishes gave the slots back


async def test_slack_mentions_over_the_limit_get_no_status_and_one_ephemeral_notice(
        make_rig: Any, redis_client: aioredis.Redis) -> None:  # noqa: F811
    rig = await make_rig(rate_user_per_min=3, rate_channel_per_min=0)
    events = [mention(f"<@UBOT> question {i}") for i in range(6)]
    for event in events:
        assert (await rig.post_event(event_body(event))).status == 200
    await rig.fake.wait_for(lambda: rig.fake.calls_to("chat.postEphemeral"))
    await rig.fake.wait_for(lambda: len([c for c in rig.fake.calls_to("chat.postMessage") if c.get("blocks")]) >= 3)
    assert len(await rig.jobs()) == 3
    statuses = [c for c in rig.fake.calls_to("chat.postMessage") if c.get("blocks")]
    assert sorted(c["thread_ts"] for c in statuses) == sorted(e["ts"] for e in events[:3])
    [notice] = rig.fake.calls_to("chat.postEphemeral")
    assert notice["user"] == "U0USER" and "faster than 3 per minute" in notice["text"]


async def test_a_free_slot_goes_to_the_user_running_the_fewest_jobs() -> None:
    """Two slots, both taken by a heavy user whose next jobs wait; a light user who asks later gets
    the first slot that frees. A user never holds more than its cap; cancelled waiters leave no trace."""
    slots = FairSlots(total=2, per_user=2)
    order: list[str] = []
    release: dict[str, asyncio.Event] = {}

    async def run(user: str, name: str) -> None:
        release[name] = asyncio.Event()
        async with slots.hold(user):
            order.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(run("heavy", f"h{i}")) for i in range(4)]
    await asyncio.sleep(0)
    light = asyncio.create_task(run("light", "l0"))
    cancelled = asyncio.create_task(run("other", "gone"))
    await asyncio.sleep(0)
    assert order == ["h0", "h1"] and slots.capped == 2  # h2, h3 wait on the heavy user's cap
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    release["h0"].set()
    while len(order) < 3:
        await asyncio.sleep(0)
    assert order == ["h0", "h1", "l0"]  # not h2, who waited longer
    release["h1"].set()
    release["l0"].set()
    while len(order) < 5:
        await asyncio.sleep(0)
    release["h2"].set()
    release["h3"].set()
    await asyncio.gather(*tasks, light)
    assert order == ["h0", "h1", "l0", "h2", "h3"] and slots.free == 2 and not slots.running


async def test_discord_code_over_the_limit_is_refused_privately_before_anything_is_posted(
        make_bot: Any, fake_discord: Any, redis_client: aioredis.Redis) -> None:  # noqa: F811
    bot, gw = await make_bot(rate_user_per_min=1, rate_channel_per_min=0, discord_user_concurrency=5)
    gw.interaction(gw.slash(ALICE, "first"))
    await next_job(redis_client, bot.settings)
    second = gw.slash(ALICE, "second")
    gw.interaction(second)
    calls = await fake_discord.wait_for(lambda: fake_discord.find("POST", rf"/interactions/{second['id']}/.*"))
    assert calls[0].json["type"] == 4 and calls[0].json["data"]["flags"] == 64  # ephemeral, no defer
    assert "faster than 1 per minute" in calls[0].json["data"]["content"]
    assert len(fake_discord.find("POST", r"/channels/\d+/messages/\d+/threads")) == 1  # no thread for it
    assert await redis_client.xlen(bot.settings.key("jobs")) == 1
    assert await redis_client.zcard(bot.settings.key("discord", "active", str(ALICE))) == 1  # slot given back
