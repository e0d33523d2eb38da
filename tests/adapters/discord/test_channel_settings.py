"""``/codeloop-config``: a channel's settings, by members with Manage Server only, through the bot's
own command tree (interactions parsed by discord.py's ConnectionState), the fake REST server and
real Redis. The worker's side: tests/worker/test_channel_settings.py."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bot.adapters.discord import cli as discord_cli
from bot.adapters.discord.channel_settings import NAME, NOT_ADMIN
from bot.queue.channel_config import CHANNEL_DISABLED, ChannelConfigs
from tests.adapters.discord.rig import ALICE, BOB, EVERYONE_PERMS, next_job

pytestmark = pytest.mark.redis

MANAGE_GUILD = 1 << 5


def config_command(gw: Any, user: int, sub: str, options: dict[str, str] | None = None,
                   permissions: int = EVERYONE_PERMS, channel: dict[str, Any] | None = None) -> dict[str, Any]:
    opts = [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()]
    data = {"id": "1500000000000000002", "name": NAME, "type": 1,
            "options": [{"name": sub, "type": 1, "options": opts}]}
    return gw._interaction(2, user, channel or gw.text_channel(), data, permissions)


async def answer(fake: Any, gw: Any, payload: dict[str, Any]) -> str:
    """Deliver the interaction; its (ephemeral) response's text."""
    before = len(fake.find("POST", r"/interactions/.*/callback"))
    gw.interaction(payload)
    calls = await fake.wait_for(lambda: fake.find("POST", rf"/interactions/{payload['id']}/.*/callback"))
    assert len(fake.find("POST", r"/interactions/.*/callback")) == before + 1
    body = calls[0].json
    assert body["type"] == 4 and body["data"]["flags"] == 64  # a message only the admin sees
    return str(body["data"]["content"])


async def test_the_command_is_registered_by_the_sync_for_manage_server_only(discord_settings, fake_discord, capsys):
    args = argparse.Namespace(sync=True, guild=123, invite=False)
    assert await discord_cli.run(discord_settings(), args) == 0
    [call] = fake_discord.find("PUT", rf"/applications/{fake_discord.application_id}/guilds/123/commands")
    [config] = [c for c in call.json if c["name"] == NAME]
    assert int(config["default_member_permissions"]) == MANAGE_GUILD  # Discord offers it to nobody else
    assert config["contexts"] == [0]  # servers only
    assert {o["name"]: o["type"] for o in config["options"]} == {
        "show": 1, "set": 1, "enable": 1, "disable": 1, "reset": 1}
    [set_] = [o for o in config["options"] if o["name"] == "set"]
    [setting] = [o for o in set_["options"] if o["name"] == "setting"]
    assert [c["value"] for c in setting["choices"]] == ["rounds", "prompt", "profile"]
    assert "/codeloop-config" in capsys.readouterr().out


async def test_only_manage_server_may_show_or_change_and_bad_values_are_explained(
        make_bot, fake_discord, redis_client, model_server):
    bot, gw = await make_bot(max_rounds=3, model_profiles=f"big={model_server.url}|ds-33b")
    key = ChannelConfigs(redis_client, bot.settings).key("discord", str(fake_discord.channel_id))
    refused = await answer(fake_discord, gw, config_command(gw, BOB, "set", {"setting": "rounds", "value": "1"}))
    assert refused == NOT_ADMIN  # checked again on our side: default_member_permissions is only a default
    assert await redis_client.exists(key) == 0

    admin = EVERYONE_PERMS | MANAGE_GUILD
    shown = await answer(fake_discord, gw, config_command(gw, ALICE, "show", permissions=admin))
    assert "rounds: 3 (the default)" in shown and "offered: default, big" in shown
    saved = await answer(fake_discord, gw, config_command(gw, ALICE, "set", {"setting": "rounds", "value": "2"},
                                                          permissions=admin))
    assert saved.startswith("Saved.") and "rounds: 2 (the operator allows up to 3)" in saved
    bad = await answer(fake_discord, gw, config_command(gw, ALICE, "set", {"setting": "rounds", "value": "7"},
                                                        permissions=admin))
    assert "0 to 3 (the operator's maximum)" in bad
    bad = await answer(fake_discord, gw, config_command(gw, ALICE, "set", {"setting": "profile", "value": "huge"},
                                                        permissions=admin))
    assert "choose one of: default, big" in bad
    # used inside a /code thread, it sets up the thread's channel
    thread = gw.thread_channel(fake_discord.snowflake())
    prompt = await answer(fake_discord, gw, config_command(
        gw, ALICE, "set", {"setting": "prompt", "value": "See [docs](https://evil.example)"}, admin, thread))
    assert "“See [docs] (https://evil.example)”" in prompt  # shown inert
    stored = await redis_client.hgetall(key)
    assert stored[b"rounds"] == b"2" and stored[b"prompt"] == b"See [docs](https://evil.example)"
    assert stored[b"by"] == str(ALICE).encode()

    assert (await answer(fake_discord, gw, config_command(gw, ALICE, "reset", permissions=admin))).startswith(
        "Back to the defaults")
    assert await redis_client.exists(key) == 0


async def test_a_disabled_channel_refuses_code_and_thread_messages(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot()
    admin = EVERYONE_PERMS | MANAGE_GUILD
    first = gw.slash(ALICE, "print(1)")  # a thread started while the channel was on
    gw.interaction(first)
    entry, job = await next_job(redis_client, bot.settings)

    off = await answer(fake_discord, gw, config_command(gw, ALICE, "disable", permissions=admin))
    assert "codeloop in this channel: OFF" in off
    assert CHANNEL_DISABLED in await answer(fake_discord, gw, gw.slash(ALICE, "print(2)"))
    gw.send_message(gw.message(BOB, job.conversation.thread, "now print 3"))
    await fake_discord.wait_for(lambda: [m for m in fake_discord.in_channel(job.conversation.thread)
                                         if m["content"] == CHANNEL_DISABLED])
    gw.send_message(gw.message(BOB, fake_discord.channel_id, f"{gw.mention()} print 5"))  # asking by mention
    await fake_discord.wait_for(lambda: [m for m in fake_discord.in_channel(fake_discord.channel_id)
                                         if m["content"] == CHANNEL_DISABLED])
    assert await redis_client.xlen(bot.settings.key("jobs")) == 1  # only the first job, from before

    await answer(fake_discord, gw, config_command(gw, ALICE, "enable", permissions=admin))
    gw.send_message(gw.message(BOB, job.conversation.thread, "now print 4"))
    _, again = await next_job(redis_client, bot.settings, after=entry)
    assert again.text == "now print 4"


async def test_the_status_line_shows_a_channels_own_setup(make_bot, fake_discord, redis_client):
    from bot.core.jobs import Event
    from bot.queue.stream import JobQueue

    bot, gw = await make_bot(edit_interval_s=0.05)
    gw.interaction(gw.slash(ALICE, "print(1)"))
    _, job = await next_job(redis_client, bot.settings)
    queue = JobQueue(redis_client, bot.settings)
    setup = "model: big · up to 2 fixes"

    def status() -> str:
        return str(fake_discord.messages[int(job.meta["status_message_id"])]["content"])

    for seq, (type_, payload) in enumerate([("status", {"text": "thinking", "setup": setup}),
                                            ("final", {"text": "hi", "rounds": 1, "ok": True, "setup": setup})], 1):
        await queue.publish(job.reply_stream, Event(job_id=job.id, conversation=job.conversation, seq=seq,
                                                    type=type_, payload=payload, meta=job.meta))
        if type_ == "status":
            await fake_discord.wait_for(lambda: status() == f"⏳ thinking… · {setup}")
    await fake_discord.wait_for(lambda: status() == f"✅ Done · 1 round · {setup}")
