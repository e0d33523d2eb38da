"""``codeloop slack``: run the Slack bot in Socket Mode (default) or as an HTTP Events API endpoint.

Both modes also render replies: a LeasedReader on the ``slack`` reply stream feeds the renderer, so
several replicas can share a workspace (``bot.queue.render_lease``): each job is rendered by one of
them, and taken over by another, same messages, when it dies. SIGTERM stops taking events, lets
each job flush and commit what it was handed, hands the jobs over, then exits.
With ``CODELOOP_METRICS_PORT`` set it serves /metrics and health (bot/ops/metrics_server.py): Redis
answers, and the Socket Mode connection is up (HTTP mode: the events listener is serving).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal

from aiohttp import web
from slack_sdk.errors import SlackApiError

from bot.adapters.slack.app import EVENTS_PATH, SlackAdapter
from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.ops import metrics_server
from bot.queue import redis_conn
from bot.queue.render_lease import LeasedReader, RenderLeases

log = logging.getLogger("codeloop.slack")
SLACK_POOL_SIZE = 64  # Redis connections; each event's listener holds one for its enqueue


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["socket", "http"], help="override CODELOOP_SLACK_MODE")
    parser.add_argument("--host", help="HTTP mode: listen address (CODELOOP_SLACK_HTTP_HOST)")
    parser.add_argument("--port", type=int, help="HTTP mode: listen port (CODELOOP_SLACK_HTTP_PORT)")


def main(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.mode:
        overrides["slack_mode"] = args.mode
    if args.host:
        overrides["slack_http_host"] = args.host
    if args.port:
        overrides["slack_http_port"] = args.port
    settings = Settings.load(**overrides)
    check(settings)
    server = metrics_server.start(settings)
    try:
        asyncio.run(serve(settings))
    finally:
        if server is not None:
            server.close()
    return 0


def check(settings: Settings) -> None:
    """Fail at start with every missing secret named, not at the first event."""
    needed = ["slack_bot_token"]
    needed.append("slack_signing_secret" if settings.slack_mode == "http" else "slack_app_token")
    settings.require(*needed)
    app_token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else ""
    if settings.slack_mode == "socket" and not app_token.startswith("xapp-"):
        raise ConfigError("CODELOOP_SLACK_APP_TOKEN must be an app-level token (xapp-…) "
                          "with the connections:write scope")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGINT/SIGTERM)."""
    stop = stop or _stop_on_signals()
    # A burst of events (each listener holds a connection for its enqueue) waits for a free
    # connection of the blocking pool instead of failing.
    redis = redis_conn.connect(settings, max_connections=SLACK_POOL_SIZE)
    await redis_conn.check(redis, settings)  # one clear line at start, not 30 s of reconnect retries
    # Open connections now: making one costs ~1 ms of CPU, which would land on the first burst's acks.
    await asyncio.gather(*(redis.ping() for _ in range(16)))
    leases = RenderLeases(redis, settings, "slack")
    adapter = SlackAdapter(settings, redis, leases=leases)
    ping, close_ping = metrics_server.redis_check(settings)
    metrics_server.PROBE.watch({"redis": ping, "slack": _connecting}, live=("slack",))  # the mode replaces it
    rendering = asyncio.create_task(LeasedReader(leases).run(adapter.renderer.deliver, stop), name="slack-replies")
    try:
        await _who_am_i(adapter)
        _freeze_heap()
        if settings.slack_mode == "socket":
            await _socket_mode(adapter, settings, stop)
        else:
            await _http_mode(adapter, settings, stop)
    finally:
        metrics_server.PROBE.stop()
        stop.set()
        await rendering
        await adapter.renderer.drain()  # what this replica holds goes to another one now, not at expiry
        await adapter.close()
        await close_ping()
        await redis.aclose()


def _freeze_heap() -> None:
    """Keep what start-up loaded (SDKs, models, settings: ~70k objects, alive as long as the
    process) out of the garbage collector's full passes. Walking it took 50-80 ms here, all at
    once on the event loop: every ack pending during such a pass waited for it (measured under
    ``codeloop bench ack``: one full pass of 80 ms in a 300-event run; about 10 ms once frozen)."""
    gc.collect()
    gc.freeze()


async def _connecting() -> str:
    raise ConnectionError("connecting to Slack")


async def _who_am_i(adapter: SlackAdapter) -> None:
    """auth.test once at start: a revoked or mistyped bot token is one clear line now, not a
    failure at the first reply."""
    try:
        me = await adapter.client.auth_test()
    except SlackApiError as exc:
        error = exc.response.get("error") if exc.response is not None else None
        raise ConfigError(f"Slack rejected CODELOOP_SLACK_BOT_TOKEN ({error or exc}): copy the Bot User "
                          "OAuth Token (xoxb-…) from OAuth & Permissions; `codeloop doctor --only slack` "
                          "checks it") from None
    log.info("Slack bot %s (%s) in team %s", me.get("user"), me.get("user_id"), me.get("team"))


async def _socket_mode(adapter: SlackAdapter, settings: Settings, stop: asyncio.Event) -> None:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    assert settings.slack_app_token is not None
    handler = AsyncSocketModeHandler(adapter.app, settings.slack_app_token.get_secret_value())
    await handler.connect_async()  # type: ignore[no-untyped-call]
    log.info("connected to Slack in Socket Mode")

    async def connected() -> str:
        if not await handler.client.is_connected():
            raise ConnectionError("the Socket Mode connection to Slack is down (reconnecting)")
        return "Socket Mode connected"

    metrics_server.PROBE.watch({"slack": connected}, live=("slack",))
    try:
        await stop.wait()
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]


async def _http_mode(adapter: SlackAdapter, settings: Settings, stop: asyncio.Event) -> None:
    runner = web.AppRunner(adapter.web_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.slack_http_host, settings.slack_http_port)
    await site.start()
    log.info("listening for Slack events on http://%s:%d%s", settings.slack_http_host,
             settings.slack_http_port, EVENTS_PATH)
    where = f"{settings.slack_http_host}:{settings.slack_http_port}{EVENTS_PATH}"

    async def listening() -> str:
        if site._server is None or not site._server.is_serving():
            raise ConnectionError(f"the events listener on {where} is not serving")
        return f"HTTP mode, listening on {where}"

    metrics_server.PROBE.watch({"slack": listening}, live=("slack",))
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
