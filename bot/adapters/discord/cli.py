"""``codeloop discord``: run the bot, or register its /code command, or print its invite URL."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import discord
import redis.asyncio as aioredis

from bot import redis_conn
from bot.adapters.discord.client import CodeloopBot, invite_url
from bot.errors import ConfigError
from bot.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sync", action="store_true",
                        help="register the /code command with Discord and exit (once, and after upgrades)")
    parser.add_argument("--guild", type=int, metavar="ID",
                        help="with --sync: register in this server only; it shows at once, while global "
                             "commands can take up to an hour to appear")
    parser.add_argument("--invite", action="store_true",
                        help="print the URL that adds the bot to a server, and exit")


def main(args: argparse.Namespace) -> int:
    settings = Settings.load()
    settings.require("discord_token")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(settings, args))


async def run(settings: Settings, args: argparse.Namespace) -> int:
    assert settings.discord_token is not None
    token = settings.discord_token.get_secret_value()
    redis: aioredis.Redis[Any] = redis_conn.connect(settings)
    bot = CodeloopBot(settings, redis)
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
        bot.start_replies()
        try:
            await bot.connect()
        except discord.PrivilegedIntentsRequired:
            raise ConfigError("Discord refused the Message Content intent: enable it for the bot in the "
                              "developer portal (Bot → Privileged Gateway Intents); see docs/DISCORD.md"
                              ) from None
        return 0
    finally:
        await bot.close()
        await redis.aclose()


async def _login(bot: CodeloopBot, token: str) -> None:
    try:
        await bot.login(token)
    except discord.LoginFailure:
        raise ConfigError("Discord rejected CODELOOP_DISCORD_TOKEN (reset it under Bot → Token)") from None
