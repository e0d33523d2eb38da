"""One way to connect to Redis: a blocking pool, so bursts wait for a connection instead of
failing with ``MaxConnectionsError`` (redis-py's default pool raises past 100 connections),
and retries with backoff, so a Redis restart is ridden out instead of failing every command.

redis-py gives a pool built by hand no retries at all; every command in flight during a restart
would raise. Here a command that meets a dropped connection (or Redis still loading its AOF)
reconnects and runs again, backing off from 50 ms to 1 s, for at most ``OUTAGE_BUDGET_S`` per
call (redis-py nests the connect retries inside the command's, so a count alone would
multiply: the budget is a deadline). Callers' own loops take over after that. What
is retried is safe to repeat: enqueue is idempotent on the event id, and ``complete`` publishes
a job's final event only while the conversation's ``done`` counter is behind it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from bot.errors import QueueError
from bot.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
OUTAGE_BUDGET_S = 30.0
RETRIES = 6 + int(OUTAGE_BUDGET_S / BACKOFF_CAP_S)  # ~6 quick tries, then one a second


class _Outage:
    """One log line when Redis goes away and one when it's back, however many connections see it."""

    since: float | None = None

    @classmethod
    def lost(cls, error: Exception) -> None:
        if cls.since is None:
            cls.since = time.monotonic()
            log.warning("Redis connection lost (%s); reconnecting with backoff (%.2fs to %.0fs, up to %d tries)",
                        error, BACKOFF_BASE_S, BACKOFF_CAP_S, RETRIES)

    @classmethod
    def restored(cls) -> None:
        if cls.since is not None:
            log.warning("Redis connection restored after %.1fs", time.monotonic() - cls.since)
            cls.since = None


class LoggedRetry(Retry):  # type: ignore[misc]  # redis-py is treated as untyped (pyproject)
    async def call_with_retry(self, do: Callable[[], Awaitable[Any]], fail: Callable[..., Any],
                              is_retryable: Callable[[Exception], bool] | None = None,
                              with_failure_count: bool = False) -> Any:
        failed_at: float | None = None

        async def noted(error: Exception, *count: int) -> Any:
            nonlocal failed_at
            failed_at = failed_at or time.monotonic()
            _Outage.lost(error)
            outcome = await fail(error, *count)
            if time.monotonic() - failed_at > OUTAGE_BUDGET_S:
                raise error
            return outcome

        result = await super().call_with_retry(do, noted, is_retryable, with_failure_count)
        if failed_at is not None:
            _Outage.restored()
        return result


def retry_policy() -> Retry:
    return LoggedRetry(ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S), RETRIES)


@functools.cache
def _client_identity() -> dict[str, Any]:
    """How our connections name themselves to Redis (CLIENT LIST shows ``redis-py(codeloop_v…)``),
    computed once: left to itself, redis-py reads its version from the package metadata for every
    new connection (~1 ms of CPU each; a burst that grows the pool by 60 spent 60 ms on it)."""

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "0"

    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before driver_info
        return {"lib_version": version("redis")}
    return {"driver_info": DriverInfo(lib_version=version("redis")).add_upstream_driver("codeloop",
                                                                                        version("codeloop"))}


def connect(settings: Settings, max_connections: int | None = None) -> aioredis.Redis:
    """The client every long-running command uses (worker, console, the Slack and Discord adapters).

    The pool is sized for a worker unless ``max_connections`` says otherwise (the Slack adapter's
    burst of acks wants more). No connection opens until the first command; ``aclose()`` closes
    the pool's connections too."""
    size = max_connections or max(32, settings.worker_concurrency * 2 + 16)
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=size, timeout=30,
                                                    retry=retry_policy(), health_check_interval=15,
                                                    **_client_identity())
    return aioredis.Redis.from_pool(pool)


async def check(redis: aioredis.Redis, settings: Settings) -> None:
    """Fail with one line that says how to fix it when Redis is not there. The probe doesn't
    retry: at start, a missing Redis is a setup problem to report now, not an outage to wait out."""
    probe = aioredis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=5)
    try:
        await probe.ping()
    except (aioredis.ConnectionError, OSError) as exc:
        raise QueueError(f"Redis is not reachable at {settings.redis_url} ({exc}). Start it "
                         "(`redis-server --daemonize yes`) or set CODELOOP_REDIS_URL.") from None
    finally:
        await probe.aclose()


async def claim_once(redis: aioredis.Redis, key: str, ttl_s: int, token: str | None = None) -> bool:
    """SET NX that survives its own retry: True for the first caller, once per key.

    Our clients resend a command whose reply a Redis restart lost. A plain SET NX run twice answers
    "already set" to the very caller that set it — an event would then count as seen and never be
    rendered. The key holds the caller's ``token`` (unique per call unless given), so a resent SET
    is recognised as ours."""
    token = token or uuid.uuid4().hex
    if await redis.set(key, token, nx=True, ex=ttl_s):
        return True
    holder = await redis.get(key)
    return (holder.decode() if isinstance(holder, bytes) else holder) == token
