"""A channel's settings applied by the real worker: its profile's server gets the job under the
profile's model name, its round limit stops the loop, its prompt line reaches the model, and a
channel turned off runs nothing. Real Redis, real worker, scripted model servers over HTTP, real
sandboxes where code runs. (Setting them through the adapters: tests/adapters/*/test_channel_settings.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.agent.prompts import SYSTEM_PROMPT
from bot.core.jobs import Conversation, Event, Job
from bot.queue.channel_config import CHANNEL_DISABLED, ChannelConfigs
from bot.queue.stream import JobQueue
from tests.fakes.model_server import ScriptedModelServer

pytestmark = [pytest.mark.redis]

ALWAYS_CODE = "Checking.\n```python\nprint('round')\nraise ValueError('still wrong')\n```"


def job(channel: str, thread: str, reply: str, text: str = "hello") -> Job:
    return Job(idempotency_key=f"{channel}-{thread}", user="u", text=text, reply_stream=reply,
               conversation=Conversation(platform="slack", workspace="T1", channel=channel, thread=thread))


async def events_of(redis: aioredis.Redis, stream: str, job_id: str, timeout: float = 120) -> list[Event]:
    """The job's events, once its terminal one has arrived."""
    deadline = time.monotonic() + timeout
    while True:
        events = [Event.loads(f[b"event"]) for _, f in await redis.xrange(stream)]
        mine = [e for e in events if e.job_id == job_id]
        if any(e.terminal for e in mine):
            return mine
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        await asyncio.sleep(0.05)


@pytest.fixture
async def big_server() -> Any:
    server = await ScriptedModelServer(script=["Big answer."], served_model="ds-33b-served").start()
    yield server
    await server.stop()


async def test_a_channels_profile_and_prompt_line_reach_that_server_under_its_name(
        start_worker: Any, model_server: Any, big_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["Default answer."]
    worker = await start_worker(model_profiles=f"big={big_server.url}|ds-33b-served,fast={model_server.url}")
    configs = ChannelConfigs(redis_client, worker.settings)
    await configs.set("slack", "CBIG", "profile", "big", "UADMIN")
    await configs.set("slack", "CBIG", "prompt", "Answer in French.", "UADMIN")
    queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")

    big = job("CBIG", "1.1", reply)
    await queue.enqueue(big)
    big_events = await events_of(redis_client, reply, big.id)
    [request] = big_server.requests
    assert request["model"] == "ds-33b-served"  # the profile's served name, not CODELOOP_MODEL
    system = request["messages"][0]
    assert system == {"role": "system", "content": SYSTEM_PROMPT + "\nAnswer in French."}  # after the built-in
    assert big_events[-1].payload["text"] == "Big answer."
    # the status line's note: the model differs from the default (rounds do not)
    assert {e.payload.get("setup") for e in big_events if e.type in ("status", "final")} == {"model: big"}

    plain = job("COTHER", "1.2", reply)  # a channel nobody set up: the worker's own backend
    await queue.enqueue(plain)
    plain_events = await events_of(redis_client, reply, plain.id)
    assert len(big_server.requests) == 1 and len(model_server.requests) == 1
    assert model_server.requests[0]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert model_server.requests[0]["model"] == worker.settings.model
    assert all("setup" not in e.payload for e in plain_events)


async def test_with_no_system_prompt_the_channels_line_is_the_only_system_turn(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["Fine."]
    worker = await start_worker(system_prompt="none")
    await ChannelConfigs(redis_client, worker.settings).set("slack", "C1", "prompt", "Be brief.", "UADMIN")
    queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")
    first = job("C1", "1.1", reply)
    await queue.enqueue(first)
    await events_of(redis_client, reply, first.id)
    assert model_server.requests[0]["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.docker
async def test_a_channels_round_limit_stops_the_loop_while_the_default_channel_goes_on(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = [ALWAYS_CODE]  # code that always fails: the loop wants every round it may have
    worker = await start_worker(max_rounds=2)
    await ChannelConfigs(redis_client, worker.settings).set("slack", "CONE", "rounds", "0", "UADMIN")
    queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")

    capped = job("CONE", "1.1", reply)
    await queue.enqueue(capped)
    events = await events_of(redis_client, reply, capped.id)
    assert len(model_server.requests) == 1  # the first reply only: no fix-up rounds
    assert [e.type for e in events].count("output") == 1  # its code still ran once
    final = events[-1]
    assert final.payload["rounds"] == 1 and final.payload["setup"] == "no fixes"

    default = job("CDEF", "1.2", reply)
    await queue.enqueue(default)
    events = await events_of(redis_client, reply, default.id)
    assert len(model_server.requests) == 1 + 3  # the first reply and CODELOOP_MAX_ROUNDS=2 fixes
    assert events[-1].payload["rounds"] == 3 and "setup" not in events[-1].payload
    # the feedback the model got was the real sandbox's
    assert "ValueError: still wrong" in model_server.requests[-1]["messages"][-1]["content"]


async def test_a_disabled_channels_job_is_refused_by_the_worker_too(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    """Jobs enqueued before an admin turned the channel off (or by a path that does not check)."""
    worker = await start_worker()
    await ChannelConfigs(redis_client, worker.settings).set("slack", "COFF", "enabled", "off", "UADMIN")
    queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")
    off = job("COFF", "1.1", reply)
    await queue.enqueue(off)
    [error] = [e for e in await events_of(redis_client, reply, off.id) if e.terminal]
    assert error.type == "error" and error.payload["message"] == CHANNEL_DISABLED
    assert model_server.requests == []
