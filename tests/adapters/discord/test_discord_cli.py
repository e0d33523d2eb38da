"""``codeloop discord``: command sync, the invite URL, and start-up errors."""

from __future__ import annotations

import argparse
from urllib.parse import parse_qs, urlparse

import discord
import pytest

from bot import cli
from bot.adapters.discord import cli as discord_cli
from bot.adapters.discord.client import PERMISSIONS
from bot.core.errors import ConfigError

pytestmark = pytest.mark.redis


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    discord_cli.configure(parser)
    return parser.parse_args(argv)


async def test_sync_registers_code_in_one_guild(discord_settings, fake_discord, capsys):
    assert await discord_cli.run(discord_settings(), _args("--sync", "--guild", "123")) == 0
    [call] = fake_discord.find("PUT", rf"/applications/{fake_discord.application_id}/guilds/123/commands")
    command, config = call.json  # /code, and the admins' /codeloop-config (test_channel_settings.py)
    assert command["name"] == "code" and command["type"] == 1 and config["name"] == "codeloop-config"
    assert [(o["name"], o["type"], o["required"]) for o in command["options"]] == [
        ("prompt", 3, True), ("file", 11, False)]
    assert command["contexts"] == [0]  # servers only: a thread cannot be made in a DM
    assert call.auth == f"Bot {fake_discord.token}"
    assert capsys.readouterr().out.strip() == "registered /code, /codeloop-config in server 123"


async def test_sync_without_guild_is_global(discord_settings, fake_discord, capsys):
    assert await discord_cli.run(discord_settings(), _args("--sync")) == 0
    assert fake_discord.find("PUT", rf"/applications/{fake_discord.application_id}/commands")
    assert "all servers" in capsys.readouterr().out


async def test_invite_url_asks_for_the_scopes_and_permissions(discord_settings, fake_discord, capsys):
    assert await discord_cli.run(discord_settings(), _args("--invite")) == 0
    url = urlparse(capsys.readouterr().out.strip())
    query = parse_qs(url.query)
    assert url.netloc == "discord.com" and query["client_id"] == [str(fake_discord.application_id)]
    assert query["scope"] == ["bot applications.commands"]
    granted = discord.Permissions(int(query["permissions"][0]))
    assert granted == PERMISSIONS
    assert granted.send_messages_in_threads and granted.create_public_threads and granted.attach_files
    assert not granted.administrator


async def test_a_rejected_token_is_a_config_error(discord_settings, fake_discord):
    settings = discord_settings(discord_token="not-the-token")
    with pytest.raises(ConfigError, match="Discord rejected CODELOOP_DISCORD_TOKEN"):
        await discord_cli.run(settings, _args("--sync"))


def test_missing_token_names_the_variable(capsys):
    assert cli.main(["discord"]) == 2
    assert "CODELOOP_DISCORD_TOKEN" in capsys.readouterr().err
