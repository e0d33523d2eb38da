"""Render leases on real Redis: several replicas reading one reply stream render each job in one
place, in order; a job whose owner stops renewing is taken over with what it had not committed;
a replica that stalled past its lease learns it lost the job; what a plain reader left pending is
adopted."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event
from bot.queue.render_lease import TOMBSTONE, LeasedReader, RenderLeases
from bot.queue.replies import ReplyReader, reply_stream

pytestmark = pytest.mark.redis
CONV = Conversation(platform="slack", workspace="T", channel="C", thread="1.0")


def event(job: str, seq: int, type_: str = "delta") -> Event:
    return Event(job_id=job, conversation=CONV, seq=seq, type=type_, payload={"text": f"{seq}"})  # type: ignore[arg-type]


async def publish(redis: aioredis.Redis, stream: str, events: list[Event]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for e in events:
            pipe.xadd(stream, {"event": e.dumps()})
        await pipe.execute()


class Replica:
    """A reader whose renderer records what it was handed and commits it at once."""

    def __init__(self, redis: aioredis.Redis, settings: Any, name: str, seen: list[tuple[str, str, int]]) -> None:
        self.leases = RenderLeases(redis, settings, "t", replica=name)
        self.name = name
        self.seen = seen
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def deliver(self, ev: Event, entry: str) -> None:
        self.seen.append((self.name, ev.job_id, ev.seq))
        await asyncio.sleep(0)  # let the other replica interleave
        if ev.terminal:
            await self.leases.finish(ev.job_id)
        else:
            assert await self.leases.commit(ev.job_id, [entry], f'{{"seq":{ev.seq}}}')

    def start(self) -> Replica:
        self.task = asyncio.create_task(LeasedReader(self.leases, block_ms=50).run(self.deliver, self.stop))
        return self

    async def halt(self) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task


async def until(check: Any, what: str) -> None:
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_two_replicas_render_each_job_in_one_place_in_order(redis_client: aioredis.Redis,
                                                                  make_settings: Any) -> None:
    settings = make_settings()
    stream = reply_stream(settings, "t")
    seen: list[tuple[str, str, int]] = []
    a, b = Replica(redis_client, settings, "a", seen).start(), Replica(redis_client, settings, "b", seen).start()
    jobs = [f"job{i}" for i in range(20)]
    for j in jobs[::2]:  # b posted these jobs' status messages (as the Slack replica that took the mention does)
        assert await b.leases.own(j)
    for seq in range(1, 11):  # interleaved, in bursts, as many workers would publish them
        await publish(redis_client, stream, [event(j, seq, "final" if seq == 10 else "delta") for j in jobs])
    await until(lambda: sum(1 for s in seen if s[2] == 10) == len(jobs), "every job's final delivered")
    await a.halt()
    await b.halt()
    by_job: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for name, job, seq in seen:
        by_job[job].append((name, seq))
    for job, got in by_job.items():
        assert [seq for _, seq in got] == list(range(1, 11)), (job, got)  # in order, once each
        assert len({name for name, _ in got}) == 1, (job, got)  # one replica
    assert {job for name, job, _ in seen if name == "b"} >= set(jobs[::2])  # whoever routed them
    assert await redis_client.xlen(stream) == 0
    assert await redis_client.get(a.leases.state_key("job0")) == TOMBSTONE
    assert not await redis_client.exists(a.leases.queue_key("job0"), a.leases.lease_key("job0"))


async def test_a_silent_owner_is_replaced_after_its_lease_with_what_it_had_not_committed(
        redis_client: aioredis.Redis, make_settings: Any) -> None:
    settings = make_settings(render_lease_s=1.0)
    stream = reply_stream(settings, "t")
    seen: list[tuple[str, str, int]] = []
    dead = RenderLeases(redis_client, settings, "t", replica="dead")
    await dead.ensure_group()
    assert await dead.own("j")  # it posted the status message, then
    await publish(redis_client, stream, [event("j", 1), event("j", 2)])
    assert await dead.route() == 2
    assert await dead.commit("j", [], '{"seq":1}')  # showed seq 1 (its entry not yet deleted) and died
    heir = Replica(redis_client, settings, "heir", seen).start()
    await publish(redis_client, stream, [event("j", 3), event("j", 4, "final")])
    await until(lambda: any(s[2] == 4 for s in seen), "the heir rendered the final")
    await heir.halt()
    assert [s[2] for s in seen] == [1, 2, 3, 4]  # from the job's stream start: the renderer skips by seq
    assert not await dead.commit("j", [], "{}")  # the dead one, were it only slow, learns it lost the job


async def test_a_stalled_owner_hears_its_lease_is_gone_at_its_tick(redis_client: aioredis.Redis,
                                                                   make_settings: Any) -> None:
    settings = make_settings(render_lease_s=1.0)
    slow = RenderLeases(redis_client, settings, "t", replica="slow")
    lost: list[str] = []
    slow.on_lost = lost.append
    assert await slow.own("j")
    await redis_client.delete(slow.lease_key("j"))  # expired while it stalled...
    other = RenderLeases(redis_client, settings, "t", replica="other")
    assert await other.own("j")  # ...and another replica took it
    await slow.tick()
    assert lost == ["j"] and "j" not in slow.held


async def test_entries_a_plain_reader_left_pending_are_adopted(redis_client: aioredis.Redis,
                                                               make_settings: Any) -> None:
    settings = make_settings()
    stream = reply_stream(settings, "t")
    old = ReplyReader(redis_client, settings, "t", consumer="old-version")
    await old.ensure_group()
    await publish(redis_client, stream, [event("j", 1)])
    await redis_client.xreadgroup("t", "old-version", {stream: ">"}, count=10)  # read, then it died
    leases = RenderLeases(redis_client, settings, "t", replica="new")
    assert await leases.route() == 0  # nothing new
    await asyncio.sleep(0.01)
    assert await leases.route(adopt_idle_s=0.005) == 1
    assert "j" in leases.held and await redis_client.xlen(leases.queue_key("j")) == 1
    assert await redis_client.xlen(stream) == 0


async def test_a_replica_stepping_down_hands_its_job_over_at_the_next_tick(redis_client: aioredis.Redis,
                                                                          make_settings: Any) -> None:
    settings = make_settings()  # a 4 s lease: the handover must not wait for it
    a = RenderLeases(redis_client, settings, "t", replica="a")
    b = RenderLeases(redis_client, settings, "t", replica="b")
    assert await a.own("j") and not await b.own("j")
    await a.step_down("j")
    await b.tick()
    assert "j" in b.held and "j" not in a.held
    assert not await a.commit("j", [], "{}")


async def test_a_job_quiet_past_idle_is_let_go_and_goes_to_whoever_routes_its_next_event(
        redis_client: aioredis.Redis, make_settings: Any) -> None:
    settings = make_settings()
    stream = reply_stream(settings, "t")
    a = RenderLeases(redis_client, settings, "t", replica="a")
    b = RenderLeases(redis_client, settings, "t", replica="b")
    await a.ensure_group()
    assert await a.own("j")
    a.idle_s = 0.0
    await asyncio.sleep(0.01)
    await a.tick()
    assert "j" not in a.held and not await redis_client.exists(a.lease_key("j"))
    assert await redis_client.zscore(a.jobs_key, "j") is None  # nobody takes it at a tick
    await publish(redis_client, stream, [event("j", 1)])
    assert await b.route() == 1 and "j" in b.held
