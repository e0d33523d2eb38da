"""bot.queue.redis_conn against a real Redis: the once-only claim that survives its own resend."""

from __future__ import annotations

import redis.asyncio as aioredis

from bot.core.settings import Settings
from bot.queue.redis_conn import claim_once


async def test_claim_once_is_first_callers_even_when_its_set_is_resent(redis_client: aioredis.Redis,
                                                                       settings: Settings) -> None:
    key = settings.key("rendered", "job", "terminal")
    assert await claim_once(redis_client, key, 60, token="mine")
    assert await claim_once(redis_client, key, 60, token="mine")  # the same SET again after a lost reply
    assert not await claim_once(redis_client, key, 60, token="another")
    assert not await claim_once(redis_client, key, 60)  # a fresh token each call by default
    assert 0 < await redis_client.ttl(key) <= 60
