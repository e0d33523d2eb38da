"""Redis restarts (AOF on) while mentions flow through the real Slack adapter: signed Events API
requests into slack_bolt, redelivered the way Slack does when an ack is late or fails, a real
worker, and replies rendered at the fake Slack Web API. Every mention gets one job, one answer and
one ✅ — none lost, none doubled — and the adapter reconnects by itself."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.adapters.slack.app import EVENTS_PATH, SlackAdapter
from bot.core.jobs import Event
from bot.queue import redis_conn
from bot.queue.render_lease import LeasedReader, RenderLeases
from bot.queue.replies import ReplyReader
from tests.adapters.slack.conftest import CHANNEL, SECRET, event_body, fake_slack, mention, sign  # noqa: F401
from tests.fakes.slack_api import FakeSlackAPI
from tests.faults.conftest import RedisServer

MENTIONS = 300
SLACK_TIMEOUT_S = 3.0  # Slack gives an Events API request 3 s, then redelivers it
REDELIVERIES = 6


def _echo(messages: list[dict[str, Any]]) -> str:
    return f"answer to {messages[-1]['content']}"


# 1 s: the adapter's reconnect-and-retry absorbs it inside Slack's 3 s; 4 s: acks time out and
# "Slack" redelivers while the first deliveries are still retrying — both must make one job.
# leased: the reply path `codeloop slack` runs (render leases, bot/queue/render_lease.py)
@pytest.mark.parametrize("leased", [False, True], ids=["reader", "leased"])
@pytest.mark.parametrize("down_s", [1.0, 4.0])
async def test_redis_restart_under_slack_traffic_loses_and_doubles_nothing(
        redis_server: RedisServer, text_worker: Any, model_server: Any, make_settings: Any,
        fake_slack: FakeSlackAPI, caplog: pytest.LogCaptureFixture, down_s: float,  # noqa: F811
        leased: bool) -> None:
    caplog.set_level(logging.INFO)
    model_server.script = _echo
    settings = make_settings(redis_url=redis_server.url, llm_url=model_server.url, worker_concurrency=16,
                             claim_idle_s=2.0, rate_user_per_min=0, rate_channel_per_min=0, user_pending_max=0,
                             worker_user_concurrency=16, slack_bot_token=fake_slack.token,
                             slack_signing_secret=SECRET, slack_mode="http", slack_api_url=fake_slack.api_url,
                             slack_http_host="127.0.0.1")
    await text_worker(settings)

    # the adapter as `codeloop slack --mode http` runs it: bolt's HTTP app + the reply renderer
    redis = redis_conn.connect(settings, max_connections=64)
    leases = RenderLeases(redis, settings, "slack") if leased else None
    adapter = SlackAdapter(settings, redis, edit_interval=0.2, leases=leases)
    runner = web.AppRunner(adapter.web_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}{EVENTS_PATH}"  # type: ignore[union-attr]
    stop_reading = asyncio.Event()
    reader = ReplyReader(redis, settings, "slack")
    finals_rendered: collections.Counter[str] = collections.Counter()

    async def render(event: Event) -> None:
        if event.terminal:
            finals_rendered[event.job_id] += 1
        await adapter.renderer.handle(event)

    async def deliver(event: Event, entry: str) -> None:
        if event.terminal:
            finals_rendered[event.job_id] += 1
        await adapter.renderer.deliver(event, entry)

    if leases is not None:
        reading = asyncio.create_task(LeasedReader(leases, block_ms=200).run(deliver, stop_reading))
    else:
        reading = asyncio.create_task(reader.run(render, stop_reading, block_ms=200))

    mentions = [mention(f"<@UBOT> question {i}") for i in range(MENTIONS)]
    deliveries: collections.Counter[str] = collections.Counter()  # event id -> requests sent

    async def slack_delivers(http: aiohttp.ClientSession, i: int) -> None:
        """One event, at least once: redelivered (same event id, X-Slack-Retry-Num) until a 200."""
        body = json.dumps(event_body(mentions[i], f"EvRestart{i}"))
        for retry in range(REDELIVERIES + 1):
            deliveries[f"EvRestart{i}"] += 1
            headers = {"Content-Type": "application/json", **sign(body)}
            if retry:
                headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"})
            try:
                async with http.post(url, data=body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=SLACK_TIMEOUT_S)) as resp:
                    if resp.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
        raise AssertionError(f"event {i} was never acked")

    async def traffic(http: aiohttp.ClientSession) -> None:
        sending: list[asyncio.Task[None]] = []
        for i in range(MENTIONS):
            sending.append(asyncio.create_task(slack_delivers(http, i)))
            await asyncio.sleep(0.012)  # ~3.6 s of steady traffic
        await asyncio.gather(*sending)

    async with aiohttp.ClientSession() as http:
        flowing = asyncio.create_task(traffic(http))
        while sum(deliveries.values()) < MENTIONS // 3:
            await asyncio.sleep(0.01)
        t_down = time.monotonic()
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(redis_server.start)
        outage = time.monotonic() - t_down
        await asyncio.wait_for(flowing, timeout=120)

    def done(m: dict[str, Any]) -> list[Any]:
        return [r for r in fake_slack.reactions if r[1] == m["ts"]]

    deadline = time.monotonic() + 90
    while sum(1 for m in mentions if done(m)) < MENTIONS and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # a doubled answer, if any, would be rendered by now
    stop_reading.set()
    await reading

    # finished jobs leave the stream: count them by idempotency key (event id -> job id) and by
    # each mention's thread, whose seq counter says how many jobs it got
    jobs = {k.decode(): (await redis.get(k)).decode().split(":")[0]
            async for k in redis.scan_iter(match=settings.key("idem", "slack", "*"))}
    seqs = [await redis.get(k) async for k in redis.scan_iter(match=settings.key("conv", "*", "seq"))]
    assert len(jobs) == MENTIONS and len(seqs) == MENTIONS and set(seqs) == {b"1"}, "a mention became two jobs"
    missing = [i for i, m in enumerate(mentions) if not done(m)]
    if missing:
        i = missing[0]
        job_id = next((j for k, j in jobs.items() if k.endswith(f"EvRestart{i}")), None)
        detail = {"job": job_id, "final rendered": job_id and finals_rendered.get(job_id),
                  "deliveries": deliveries[f"EvRestart{i}"],
                  "thread": [msg["text"][:60] for msg in fake_slack.thread(CHANNEL, mentions[i]["ts"])]}
        raise AssertionError(f"{len(missing)} mentions never got their ✅ (outage {outage:.1f}s): #{i} {detail}")
    assert all(done(m) == [(CHANNEL, m["ts"], "white_check_mark")] for m in mentions), "a mention got two ✅"
    assert set(finals_rendered) == set(jobs.values()) and max(finals_rendered.values()) == 1
    for i, m in enumerate(mentions):
        thread = fake_slack.thread(CHANNEL, m["ts"])
        answers = [msg for msg in thread if f"answer to question {i}" in msg["text"]]
        assert len(answers) == 1, (i, [msg["text"] for msg in thread])
        assert thread[0]["text"].startswith(":white_check_mark: Done"), thread[0]["text"]
    assert await redis.xlen(settings.key("dead")) == 0

    await runner.cleanup()
    await adapter.close()
    await redis.aclose()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Redis connection lost") for m in lines), "no log line for the outage"
    assert any(m.startswith("Redis connection restored") for m in lines), "no log line for the recovery"
    redelivered = sum(deliveries.values()) - MENTIONS
    if down_s > SLACK_TIMEOUT_S:
        assert redelivered > 0, "the long outage should have made 'Slack' redeliver"
    print(f"outage {outage:.2f}s; {redelivered} redeliveries by 'Slack'")
