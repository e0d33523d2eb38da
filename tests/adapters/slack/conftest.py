"""Slack test rig: the fake Web API, the adapter serving HTTP on loopback, and signed requests."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from bot.adapters.slack.app import EVENTS_PATH, SlackAdapter
from bot.core.jobs import Job
from bot.core.settings import Settings
from bot.queue.replies import ReplyReader
from tests.fakes.slack_api import FakeSlackAPI

SECRET = "test-signing-secret"
TEAM = "T0001"
CHANNEL = "C0001"
USER = "U0USER"


def sign(body: str, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    """Headers exactly as Slack sends them: v0=HMAC-SHA256(secret, "v0:{ts}:{body}")."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def event_body(event: dict[str, Any], event_id: str | None = None, team: str = TEAM) -> dict[str, Any]:
    return {"token": "legacy", "team_id": team, "api_app_id": "A0001", "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}", "event_time": int(time.time()),
            "event": {"event_ts": event.get("ts"), **event}}


_ts = iter(range(1, 10**9))


def new_ts() -> str:
    return f"{int(time.time())}.{next(_ts):06d}"


def mention(text: str = "<@UBOT> print 1+1", **extra: Any) -> dict[str, Any]:
    return {"type": "app_mention", "user": USER, "text": text, "channel": CHANNEL, "ts": new_ts(), **extra}


def message(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "message", "user": USER, "text": text, "channel": CHANNEL, "channel_type": "channel",
            "ts": new_ts(), **extra}


def press(status: dict[str, Any], user: str, channel: str = CHANNEL) -> dict[str, Any]:
    """The block_actions payload Slack sends when ``user`` presses the Stop button of ``status``
    (a recorded chat.postMessage call)."""
    blocks = status["blocks"] if isinstance(status["blocks"], list) else json.loads(status["blocks"])
    button = blocks[1]["elements"][0]
    return {"type": "block_actions", "team": {"id": TEAM}, "user": {"id": user}, "channel": {"id": channel},
            "trigger_id": "trig", "container": {"type": "message", "thread_ts": status.get("thread_ts")},
            "message": {"ts": "1.000001", "thread_ts": status.get("thread_ts")},
            "actions": [{"action_id": button["action_id"], "value": button["value"], "type": "button",
                         "action_ts": new_ts(), "block_id": "b"}]}


async def wait_listed(rig: Rig, job: Job) -> None:
    """Until the adapter has listed ``job`` as running in its thread (done after the ack), so a
    typed ``stop`` finds it."""
    conv = job.conversation
    thread = rig.settings.key("slack", "thread", conv.workspace, conv.channel, conv.thread)
    for _ in range(200):
        joined = conv.thread == "dm" or await rig.redis.exists(thread)
        if joined and job.id in await rig.adapter.ownership.active(conv):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job.id} was never listed")


@dataclass
class Rig:
    fake: FakeSlackAPI
    adapter: SlackAdapter
    settings: Settings
    url: str
    http: aiohttp.ClientSession
    redis: Any

    async def post_event(self, body: dict[str, Any], *, secret: str = SECRET, timestamp: int | None = None,
                         headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        raw = json.dumps(body)
        hdrs = {"Content-Type": "application/json", **sign(raw, secret, timestamp), **(headers or {})}
        async with self.http.post(self.url + EVENTS_PATH, data=raw, headers=hdrs) as resp:
            await resp.read()
            return resp

    async def post_interaction(self, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        raw = urlencode({"payload": json.dumps(payload)})
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", **sign(raw)}
        async with self.http.post(self.url + EVENTS_PATH, data=raw, headers=hdrs) as resp:
            await resp.read()
            return resp

    async def jobs(self) -> list[Job]:
        entries = await self.redis.xrange(self.settings.key("jobs"))
        return [Job.loads(fields[b"job"]) for _, fields in entries]


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlackAPI]:
    fake = await FakeSlackAPI().start()
    yield fake
    await fake.close()


@pytest.fixture
def slack_settings(make_settings: Callable[..., Settings], fake_slack: FakeSlackAPI) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"slack_bot_token": fake_slack.token, "slack_signing_secret": SECRET,
                                "slack_mode": "http", "slack_api_url": fake_slack.api_url,
                                "slack_http_host": "127.0.0.1"}
        return make_settings(**{**base, **overrides})

    return factory


@pytest.fixture
async def make_rig(fake_slack: FakeSlackAPI, slack_settings: Callable[..., Settings],
                   redis_client: Any) -> AsyncIterator[Callable[..., Any]]:
    """Start the adapter's HTTP app (and its reply renderer) on 127.0.0.1; close all at teardown."""
    closers: list[Callable[[], Any]] = []

    async def factory(edit_interval: float = 0.2, **overrides: Any) -> Rig:
        settings = slack_settings(**overrides)
        adapter = SlackAdapter(settings, redis_client, edit_interval=edit_interval)
        runner = web.AppRunner(adapter.web_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stop = asyncio.Event()
        reader = ReplyReader(redis_client, settings, "slack", consumer="test")
        rendering = asyncio.create_task(reader.run(adapter.renderer.handle, stop, block_ms=50))
        http = aiohttp.ClientSession()

        async def close() -> None:
            stop.set()
            await rendering
            await http.close()
            await runner.cleanup()
            await adapter.close()

        closers.append(close)
        return Rig(fake_slack, adapter, settings, f"http://127.0.0.1:{port}", http, redis_client)

    yield factory
    for close in reversed(closers):
        await close()
