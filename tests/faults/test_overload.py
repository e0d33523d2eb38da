"""An overloaded or stalled model server: bounded retries with backoff, then the user is told,
and the next request works once the server recovers."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.queue.stream import JobQueue
from tests.faults.test_bad_input import job
from tests.faults.test_limits import UNLIMITED, terminals


@pytest.mark.parametrize("status", [429, 503])
async def test_persistent_overload_is_retried_a_bounded_number_of_times_then_reported(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis, status: int) -> None:
    model_server.script = ["recovered"]
    model_server.fail_times, model_server.fail_status = 1000, status
    worker = await text_worker(make_settings(llm_url=model_server.url, llm_retries=3, llm_backoff_s=0.05,
                                             **UNLIMITED))
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    t0 = time.monotonic()
    await queue.enqueue(job("O", reply, text="busy?"))
    [(_, event)] = await terminals(redis_client, reply, 1)
    took = time.monotonic() - t0
    assert event.type == "error" and event.payload["kind"] == "model_overloaded"
    assert event.payload["message"] == (f"The model server is overloaded and did not recover after retries "
                                        f"(HTTP {status} after 4 attempts). Try again shortly.")
    assert len(model_server.requests) == 4
    assert 0.05 * (1 + 2 + 4) <= took < 5  # it backed off (0.05, 0.1, 0.2 s at least), and gave up
    model_server.fail_times = 0
    await queue.enqueue(job("O", reply, text="now?"))
    done = await terminals(redis_client, reply, 2)
    assert done[-1][1].payload["text"] == "recovered"


async def test_a_stalled_model_server_times_out_and_the_user_is_told(
        text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = ["too late"]
    model_server.stall_s = 3.0
    worker = await text_worker(make_settings(llm_url=model_server.url, llm_timeout_s=0.5, llm_retries=1,
                                             llm_backoff_s=0.05, **UNLIMITED))
    queue = JobQueue(redis_client, worker.settings)
    reply = worker.settings.key("replies", "t")
    t0 = time.monotonic()
    await queue.enqueue(job("S", reply, text="hello?"))
    [(_, event)] = await terminals(redis_client, reply, 1, timeout=20)
    assert time.monotonic() - t0 < 5
    assert event.type == "error" and event.payload["kind"] == "model_overloaded", event.payload
    assert "did not recover after retries" in event.payload["message"], event.payload
    assert "127.0.0.1" not in event.payload["message"] and str(model_server.port) not in event.payload["message"]
    assert len(model_server.requests) == 2
