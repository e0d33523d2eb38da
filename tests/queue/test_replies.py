"""The adapter-side reply reader: entries delivered but never seen, and a dead replica's entries."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event
from bot.core.settings import Settings
from bot.queue import replies
from bot.queue.replies import ReplyReader

CONV = Conversation(platform="test", channel="c", thread="t")


def final(job: str) -> Event:
    return Event(job_id=job, conversation=CONV, seq=1, type="final", payload={"text": job})


async def _render_until(reader: ReplyReader, want: set[str], within_s: float) -> set[str]:
    seen: set[str] = set()
    stop = asyncio.Event()

    async def handler(event: Event) -> None:
        seen.add(event.job_id)
        if want <= seen:
            stop.set()

    task = asyncio.create_task(reader.run(handler, stop, block_ms=100))
    deadline = time.monotonic() + within_s
    while not stop.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    return seen


async def test_entries_delivered_to_the_reader_but_never_seen_are_rendered(
        redis_client: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """An XREADGROUP whose reply a Redis restart lost is resent and moves on; what the first one
    delivered is pending for this reader. It is found again (here faked by reading it away)."""
    monkeypatch.setattr(replies, "PENDING_CHECK_S", 0.3)
    reader = ReplyReader(redis_client, settings, "t", consumer="reader-1")
    await reader.ensure_group()
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(event: Event) -> None:
        seen.append(event.job_id)

    task = asyncio.create_task(reader.run(handler, stop, block_ms=100))
    await asyncio.sleep(0.2)
    await redis_client.xadd(reader.stream, {"event": final("lost").dumps()})
    # the "lost reply": delivered to reader-1's name, but the reader itself never gets it
    await redis_client.xreadgroup(reader.group, "reader-1", {reader.stream: ">"}, count=10)
    await redis_client.xadd(reader.stream, {"event": final("after").dumps()})
    deadline = time.monotonic() + 5
    while set(seen) != {"lost", "after"} and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    assert sorted(seen) == ["after", "lost"]
    assert (await redis_client.xpending(reader.stream, reader.group))["pending"] == 0


async def test_a_dead_replicas_entries_are_taken_over(redis_client: aioredis.Redis, settings: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replies, "ORPHAN_IDLE_S", 0.2)
    monkeypatch.setattr(replies, "PENDING_CHECK_S", 0.1)
    dead = ReplyReader(redis_client, settings, "t", consumer="dead-replica")
    await dead.ensure_group()
    await redis_client.xadd(dead.stream, {"event": final("orphan").dumps()})
    await redis_client.xreadgroup(dead.group, "dead-replica", {dead.stream: ">"}, count=10)  # then it died
    await asyncio.sleep(0.3)
    alive = ReplyReader(redis_client, settings, "t", consumer="alive")
    assert await _render_until(alive, {"orphan"}, within_s=5) == {"orphan"}


