"""One way to connect to Redis: a blocking pool, so bursts wait for a connection instead of
failing with ``MaxConnectionsError`` (redis-py's default pool raises past 100 connections)."""

from __future__ import annotations

import redis.asyncio as aioredis

from bot.errors import QueueError
from bot.settings import Settings


def connect(settings: Settings, max_connections: int | None = None) -> aioredis.Redis:
    size = max_connections or max(32, settings.worker_concurrency * 2 + 16)
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=size, timeout=30)
    return aioredis.Redis(connection_pool=pool)


async def check(redis: aioredis.Redis, settings: Settings) -> None:
    """Fail with one line that says how to fix it when Redis is not there."""
    try:
        await redis.ping()
    except (aioredis.ConnectionError, OSError) as exc:
        raise QueueError(f"Redis is not reachable at {settings.redis_url} ({exc}). Start it "
                         "(`redis-server --daemonize yes`) or set CODELOOP_REDIS_URL.") from None
