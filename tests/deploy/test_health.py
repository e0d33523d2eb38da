"""Every long-running command serves /metrics, /healthz and /livez, and its health tells the truth.

Each test starts the real command as an operator does (``python -m bot.cli slack|discord|worker``,
a process of its own) against fakes on loopback and a Redis of its own, then breaks a part for
real (kills Redis, takes the Discord gateway away) and reads the probes again. Compose
healthchecks and Kubernetes probes call these same endpoints (tests/deploy/test_compose.py,
test_k8s.py check that they do).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.discord_gateway import GatewayDiscord
from tests.fakes.slack_server import ScopedSlackAPI
from tests.faults.conftest import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]
WITHIN_S = 90.0  # a bound for a hung command on a busy 2-core box, not a speed expectation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Command:
    """``codeloop <name>`` in a process of its own; its stderr is collected for the log checks."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.stderr = b""

    async def probe(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}{path}",
                                                             timeout=aiohttp.ClientTimeout(total=15)) as resp:
            body = await resp.read()
            return resp.status, (json.loads(body) if path != "/metrics" else body.decode())

    async def until(self, path: str, wanted: Callable[[int, Any], bool]) -> tuple[int, Any]:
        """Poll ``path`` until ``wanted(status, body)``; fail with the last answer and the log."""
        deadline = time.monotonic() + WITHIN_S
        last: object = "no answer"
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                status, body = await self.probe(path)
                last = (status, body)
                if wanted(status, body):
                    return status, body
            await asyncio.sleep(0.2)
        await self.stop()
        pytest.fail(f"{path} never answered as wanted; last: {last}; exit {self.proc.returncode}; log:\n"
                    + self.stderr.decode(errors="replace")[-3000:])

    async def stop(self, signal_it: bool = True) -> int:
        """SIGTERM (as compose and Kubernetes stop it), or with ``signal_it=False`` wait for its own
        exit; returns the exit status."""
        if signal_it and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stderr is not None
        self.stderr += await asyncio.wait_for(self.proc.stderr.read(), 60)
        return await asyncio.wait_for(self.proc.wait(), 60)


@pytest.fixture
async def command() -> AsyncIterator[Callable[..., Any]]:
    started: list[Command] = []

    async def start(*argv: str, **env: str) -> Command:
        port = free_port()
        full = {**os.environ, "CODELOOP_METRICS_PORT": str(port), "CODELOOP_LOG_JSON": "true", **env}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot.cli", *argv, env=full,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        started.append(Command(proc, port))
        return started[-1]

    yield start
    for cmd in started:
        if cmd.proc.returncode is None:
            cmd.proc.kill()
            await cmd.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def check(body: dict[str, Any], name: str) -> bool:
    return bool(body.get("checks", {}).get(name, {}).get("ok"))


def healthy(status: int, body: Any) -> bool:
    return status == 200 and body["status"] == "ok"


async def test_slack_socket_mode_health_follows_redis_and_logs_json(command, own_redis: RedisServer) -> None:
    fake = await ScopedSlackAPI().start()
    try:
        slack = await command("slack", CODELOOP_REDIS_URL=own_redis.url, CODELOOP_SLACK_API_URL=fake.api_url,
                              CODELOOP_SLACK_BOT_TOKEN=fake.token, CODELOOP_SLACK_APP_TOKEN=fake.app_token)
        _, body = await slack.until("/healthz", healthy)
        assert check(body, "redis") and check(body, "slack") and check(body, "event_loop")
        assert body["checks"]["slack"]["detail"] == "Socket Mode connected"
        status, metrics = await slack.probe("/metrics")
        assert status == 200 and "# HELP codeloop_jobs_total" in metrics and "python_info" in metrics
        assert fake.token not in json.dumps(body) + metrics and fake.app_token not in json.dumps(body) + metrics

        own_redis.kill()  # Redis gone: not ready, but alive (a restart would not bring Redis back)
        _, body = await slack.until("/healthz", lambda s, b: s == 503 and not check(b, "redis"))
        assert check(body, "slack") and check(body, "event_loop")
        status, live = await slack.probe("/livez")
        assert status == 200 and set(live["checks"]) == {"event_loop", "slack"}

        own_redis.start()
        await slack.until("/healthz", healthy)
        assert await slack.stop() == 0
    finally:
        await fake.close()
    lines = [line for line in slack.stderr.decode().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # JSON logs in the bots too, not only the worker
    assert any(r["msg"] == "connected to Slack in Socket Mode" and r["level"] == "INFO" for r in records)
    assert any("Slack bot codeloop (UBOT) in team Fake" in r["msg"] for r in records)


async def test_slack_http_mode_is_healthy_while_listening(command, own_redis: RedisServer) -> None:
    fake = await ScopedSlackAPI().start()
    port = free_port()
    try:
        slack = await command("slack", "--mode", "http", "--host", "127.0.0.1", "--port", str(port),
                              CODELOOP_REDIS_URL=own_redis.url, CODELOOP_SLACK_API_URL=fake.api_url,
                              CODELOOP_SLACK_BOT_TOKEN=fake.token, CODELOOP_SLACK_SIGNING_SECRET="s3cret",
                              CODELOOP_LOG_LEVEL="WARNING")
        _, body = await slack.until("/healthz", healthy)
        assert body["checks"]["slack"]["detail"] == f"HTTP mode, listening on 127.0.0.1:{port}/slack/events"
        assert await slack.stop() == 0
    finally:
        await fake.close()
    assert slack.stderr.strip() == b""  # CODELOOP_LOG_LEVEL=WARNING holds for the bot too


async def test_a_revoked_slack_token_stops_the_bot_at_start(command, own_redis: RedisServer) -> None:
    fake = await ScopedSlackAPI().start()
    fake.revoked.add(fake.token)
    try:
        slack = await command("slack", CODELOOP_REDIS_URL=own_redis.url, CODELOOP_SLACK_API_URL=fake.api_url,
                              CODELOOP_SLACK_BOT_TOKEN=fake.token, CODELOOP_SLACK_APP_TOKEN=fake.app_token)
        assert await slack.stop(signal_it=False) == 2
    finally:
        await fake.close()
    assert "Slack rejected CODELOOP_SLACK_BOT_TOKEN (token_revoked)" in slack.stderr.decode()


async def test_discord_health_follows_the_gateway_connection(command, own_redis: RedisServer) -> None:
    fake = await GatewayDiscord().start()
    try:
        bot = await command("discord", CODELOOP_REDIS_URL=own_redis.url, CODELOOP_DISCORD_TOKEN=fake.token,
                            CODELOOP_DISCORD_API_URL=fake.api_url, CODELOOP_DISCORD_GATEWAY_URL=fake.gateway_url)
        _, body = await bot.until("/healthz", healthy)
        assert body["checks"]["discord"]["detail"].startswith("gateway connected as codeloop")
        assert fake.identified and fake.identified[0]["token"] == fake.token

        fake.refuse_gateway = True  # an outage: the session drops and reconnecting fails
        for ws in list(fake._sockets):
            await ws.close()
        _, body = await bot.until("/healthz", lambda s, b: s == 503 and not check(b, "discord"))
        assert check(body, "redis")
        status, live = await bot.probe("/livez")
        assert status == 503 and not check(live, "discord")  # a restart may cure this one

        fake.refuse_gateway = False
        await bot.until("/livez", healthy)
        assert await bot.stop() == 0
    finally:
        await fake.close()


@pytest.mark.docker
async def test_worker_serves_metrics_and_health(command, own_redis: RedisServer) -> None:
    worker = await command("worker", CODELOOP_REDIS_URL=own_redis.url, CODELOOP_LLM_URL="http://127.0.0.1:9",
                           CODELOOP_SANDBOX_POOL_SIZE="0",
                           CODELOOP_SANDBOX_IMAGE=os.environ.get("CODELOOP_TEST_SANDBOX_IMAGE",
                                                                 "codeloop-sandbox:latest"))
    _, body = await worker.until("/healthz", healthy)
    assert set(body["checks"]) == {"event_loop", "redis", "worker"}
    assert body["checks"]["worker"]["detail"] == "0 job(s) held"
    status, metrics = await worker.probe("/metrics")
    assert status == 200 and "codeloop_queue_depth" in metrics
    own_redis.kill()
    await worker.until("/healthz", lambda s, b: s == 503 and not check(b, "redis"))
    status, _ = await worker.probe("/livez")
    assert status == 200
    own_redis.start()  # back before the stop: a worker stopping without Redis waits out its retries
    await worker.until("/healthz", healthy)
    assert await worker.stop() == 0
