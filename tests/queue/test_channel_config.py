"""The channel-settings hash in real Redis: values checked when written, read leniently later
(the operator may have lowered CODELOOP_MAX_ROUNDS or dropped a profile since), no TTL."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.errors import InputRejected
from bot.queue.channel_config import ChannelConfig, ChannelConfigs, clean_prompt

pytestmark = pytest.mark.redis


async def test_stored_without_expiry_and_read_back_within_todays_limits(make_settings, redis_client):
    then = make_settings(max_rounds=5, model_profiles="big=http://127.0.0.1:9|x")
    configs = ChannelConfigs(redis_client, then)
    await configs.set("slack", "C1", "rounds", "4", "UADMIN")
    await configs.set("slack", "C1", "profile", "big", "UADMIN")
    assert await redis_client.ttl(configs.key("slack", "C1")) == -1  # kept until an admin resets it
    assert ChannelConfigs(redis_client, then).key("discord", "C1") != configs.key("slack", "C1")

    config = await configs.get("slack", "C1")
    assert (config.max_rounds(then), config.profile_name(then), config.note(then)) == (4, "big",
                                                                                       "model: big · up to 4 fixes")
    now = make_settings(max_rounds=2)  # the operator lowered the maximum and dropped the profile
    assert (config.max_rounds(now), config.profile_name(now), config.note(now)) == (2, "default", "")
    with pytest.raises(InputRejected, match="from 0 to 2"):
        await ChannelConfigs(redis_client, now).set("slack", "C1", "rounds", "4", "UADMIN")


async def test_garbage_in_the_hash_counts_as_unset(make_settings, redis_client):
    settings = make_settings()
    configs = ChannelConfigs(redis_client, settings)
    await redis_client.hset(configs.key("slack", "C2"), mapping={"rounds": "-3", "enabled": "maybe", "at": "x"})
    assert await configs.get("slack", "C2") == ChannelConfig(rounds=None, enabled=True, at=0.0)
    assert ChannelConfig(rounds=1).note(settings) == "up to 1 fix"
    assert ChannelConfig(rounds=0).note(settings) == "no fixes"


def test_the_prompt_line_is_cleaned_like_user_text():
    assert clean_prompt("  Be\u202e brief.\n\nAnd\tkind\x00 \ud800 ") == "Be brief. And kind \ufffd"


async def test_a_burst_of_enabled_checks_agrees_and_a_change_here_applies_at_once(make_settings, redis_client):
    configs = ChannelConfigs(redis_client, make_settings())
    assert await asyncio.gather(*(configs.enabled("slack", "C3") for _ in range(50))) == [True] * 50
    await configs.set("slack", "C3", "enabled", "off", "UADMIN")
    assert await asyncio.gather(*(configs.enabled("slack", "C3") for _ in range(50))) == [False] * 50
