"""Discord test rig fixtures: the fake REST server and a logged-in bot (see rig.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.adapters.discord.client import CodeloopBot
from bot.core.settings import Settings
from tests.adapters.discord.rig import Gateway
from tests.fakes.discord_api import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    fake = await FakeDiscord().start()
    yield fake
    await fake.close()


@pytest.fixture
def discord_settings(make_settings: Callable[..., Settings], fake_discord: FakeDiscord) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        base = {"discord_token": fake_discord.token, "discord_api_url": fake_discord.api_url}
        return make_settings(**{**base, **overrides})

    return factory


@pytest.fixture
async def make_bot(discord_settings: Callable[..., Settings], redis_client: aioredis.Redis,
                   fake_discord: FakeDiscord) -> AsyncIterator[Callable[..., Awaitable[tuple[CodeloopBot, Gateway]]]]:
    """A bot logged in to the fake (no gateway connection), its guild known from GUILD_CREATE,
    rendering its reply stream."""
    bots: list[CodeloopBot] = []

    async def factory(edit_interval_s: float = 0.2, **overrides: Any) -> tuple[CodeloopBot, Gateway]:
        bot = CodeloopBot(discord_settings(**overrides), redis_client, edit_interval_s=edit_interval_s)
        bots.append(bot)
        await bot.login(fake_discord.token)
        gateway = Gateway(fake_discord, bot)
        bot._connection.parse_guild_create(gateway.guild_create())  # type: ignore[arg-type]
        bot.start_replies()
        return bot, gateway

    yield factory
    for bot in bots:
        await bot.close()
