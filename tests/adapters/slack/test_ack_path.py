"""The ack path: work after an ack waits for the acks still in flight (bot/adapters/slack/acks.py);
a signed event taken without bolt (bot/adapters/slack/direct.py) keeps the at-least-once contract."""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis.asyncio as aioredis

from bot.adapters.slack.acks import AckFirst
from bot.queue.stream import JobQueue
from tests.adapters.slack.conftest import event_body, mention


async def test_post_ack_work_waits_until_no_ack_is_pending():
    acks = AckFirst(max_wait_s=60)
    order: list[str] = []

    async def after_ack() -> None:
        await acks.quiet()
        order.append("post-ack work")

    with acks.answering():
        with acks.answering():
            task = asyncio.create_task(after_ack())
            for _ in range(20):  # plenty of turns for the task, had it not been held back
                await asyncio.sleep(0)
            order.append("first ack")
        for _ in range(20):
            await asyncio.sleep(0)
        order.append("second ack")
    await task
    assert order == ["first ack", "second ack", "post-ack work"] and acks.in_flight == 0


async def test_idle_means_no_wait_and_a_steady_stream_cannot_starve_the_work():
    acks = AckFirst(max_wait_s=0.05)
    await acks.quiet()  # nothing in flight: returns at once
    with acks.answering():  # never quiet while this is open: the work still runs after max_wait_s
        await acks.quiet()
        assert acks.in_flight == 1


@pytest.mark.redis
async def test_a_failed_enqueue_answers_500_and_slacks_retry_makes_the_one_job(make_rig):
    rig = await make_rig()
    with socket.socket() as s:  # a port nothing listens on: Redis "down" for this adapter
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    working = rig.adapter.queue
    down = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    rig.adapter.queue = JobQueue(down, rig.settings)
    body = event_body(mention(), "EvDown")
    try:
        assert (await rig.post_event(body)).status == 500  # not acked: Slack will deliver it again
    finally:
        rig.adapter.queue = working
        await down.aclose()
    assert await rig.jobs() == []
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_error"}
    assert (await rig.post_event(body, headers=retry)).status == 200
    assert (await rig.post_event(body, headers={**retry, "X-Slack-Retry-Num": "2"})).status == 200
    assert [j.idempotency_key for j in await rig.jobs()] == ["EvDown"]
