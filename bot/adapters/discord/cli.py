"""``codeloop discord``: run the bot, or register its /code command, or print its invite URL.

Running, with ``CODELOOP_METRICS_PORT`` set, it serves /metrics and health (bot/ops/metrics_server.py):
Redis answers, and the gateway connection is up.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import discord
import redis.asyncio as aioredis
import yarl
from discord.gateway import DiscordWebSocket

from bot.adapters.discord.client import CodeloopBot, invite_url
from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.ops import metrics_server
from bot.queue import redis_conn


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sync", action="store_true",
                        help="register the /code and /codeloop-config commands with Discord and exit "
                             "(once, and after upgrades)")
    parser.add_argument("--guild", type=int, metavar="ID",
                        help="with --sync: register in this server only; it shows at once, while global "
                             "commands can take up to an hour to appear")
    parser.add_argument("--invite", action="store_true",
                        help="print the URL that adds the bot to a server, and exit")


def main(args: argparse.Namespace) -> int:
    settings = Settings.load()
    settings.require("discord_token")
    server = None if args.sync or args.invite else metrics_server.start(settings)
    try:
        return asyncio.run(run(settings, args))
    finally:
        if server is not None:
            server.close()


async def run(settings: Settings, args: argparse.Namespace) -> int:
    assert settings.discord_token is not None
    token = settings.discord_token.get_secret_value()
    redis: aioredis.Redis[Any] = redis_conn.connect(settings)
    bot = CodeloopBot(settings, redis)
    close_ping = None
    try:
        if args.sync or args.invite:
            await _login(bot, token)
            assert bot.application_id is not None
            if args.invite:
                print(invite_url(bot.application_id))
            if args.sync:
                guild = discord.Object(args.guild) if args.guild else None
                if guild is not None:
                    bot.tree.copy_global_to(guild=guild)
                synced = await bot.tree.sync(guild=guild)
                where = f"server {args.guild}" if guild else "all servers (may take up to an hour to show)"
                print(f"registered {', '.join('/' + c.name for c in synced)} in {where}")
            return 0
        await redis_conn.check(redis, settings)
        await _login(bot, token)
        # process-wide, like the REST base (client.use_api_url): one bot per process
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
        ping, close_ping = metrics_server.redis_check(settings)
        metrics_server.PROBE.watch({"redis": ping, "discord": _gateway(bot)}, live=("discord",))
        bot.start_replies()
        loop = asyncio.get_running_loop()
        closing: set[asyncio.Task[None]] = set()
        for sig in (signal.SIGINT, signal.SIGTERM):  # compose and Kubernetes stop with SIGTERM
            loop.add_signal_handler(sig, lambda: closing.add(loop.create_task(bot.close())))
        try:
            await bot.connect()
        except discord.PrivilegedIntentsRequired:
            raise ConfigError("Discord refused the Message Content intent: enable it for the bot in the "
                              "developer portal (Bot → Privileged Gateway Intents); see docs/DISCORD.md"
                              ) from None
        return 0
    finally:
        metrics_server.PROBE.stop()
        await bot.close()
        if close_ping is not None:
            await close_ping()
        await redis.aclose()


def _gateway(bot: CodeloopBot) -> metrics_server.Check:
    async def connected() -> str:
        if bot.is_closed() or not bot.is_ready() or bot.ws is None or not bot.ws.open:
            raise ConnectionError("the gateway connection to Discord is not up (connecting or reconnecting)")
        return f"gateway connected as {bot.user} ({bot.latency * 1000:.0f} ms heartbeat)"

    return connected


async def _login(bot: CodeloopBot, token: str) -> None:
    try:
        await bot.login(token)
    except discord.LoginFailure:
        raise ConfigError("Discord rejected CODELOOP_DISCORD_TOKEN (reset it under Bot → Token)") from None
