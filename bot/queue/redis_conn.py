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

Behind Sentinel (``CODELOOP_REDIS_SENTINELS``) every client here, the probes and the doctor's
included, asks the sentinels for the master instead of dialling ``CODELOOP_REDIS_URL``'s host:
a connection the dead master dropped reconnects through them, and one still open to an old
master that came back as a replica turns its ``READONLY`` reply into a reconnect (redis-py's
``SentinelManagedConnection``); either way the command runs again on the new master within the
same outage budget. Scripts the new master lacks are loaded on ``NOSCRIPT`` (``bot.queue.autopipe``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
import redis.retry
import redis.sentinel
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import NoScriptError

from bot.core.errors import QueueError
from bot.core.settings import Settings

if TYPE_CHECKING:
    from bot.queue.autopipe import LuaScript

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


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):  # type: ignore[misc]
    """The master's pool behind Sentinel, waiting for a free connection as the plain one does."""


class _FollowingConnection(SentinelManagedConnection):  # type: ignore[misc]
    """A master connection that asks the sentinels where the master is on every (re)connect.

    redis-py's own asks only when the pool hands out an unconnected connection: a command that
    loses its connection is retried on the same one, whose reconnect (``send_packed_command`` ->
    ``connect_check_health``) dials the old address again until the retry budget runs out."""

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()


class _FollowingSSLConnection(_FollowingConnection, aioredis.SSLConnection):  # type: ignore[misc]
    pass


class _SentinelRedis(aioredis.Redis):  # type: ignore[misc]
    """A master client that closes its sentinel connections with its own."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            await self.sentinel.aclose()


def _sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    out = []
    for item in settings.redis_sentinels:
        host, _, port = item.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def _sentinel_kwargs(settings: Settings, timeout: float, retry: Any) -> dict[str, Any]:
    """How we talk to the sentinels themselves: no retries (a dead one is skipped for the next),
    a short timeout, their own password and TLS."""
    kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout,
                              "retry": retry, **_client_identity()}
    if settings.redis_sentinel_password is not None:
        kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    if settings.redis_sentinel_tls:
        kwargs["ssl"] = True
        if settings.redis_sentinel_tls_ca:
            kwargs["ssl_ca_certs"] = settings.redis_sentinel_tls_ca
    return kwargs


def _master_kwargs(settings: Settings, blocking: bool = False) -> dict[str, Any]:
    """What CODELOOP_REDIS_URL still says behind Sentinel: credentials, db, TLS (rediss://) and its
    query options; host and port are the sentinels' to say."""
    kwargs: dict[str, Any] = dict(aioredis.connection.parse_url(settings.redis_url))
    for name in ("host", "port", "path"):
        kwargs.pop(name, None)
    tls = kwargs.pop("connection_class", None) is aioredis.SSLConnection
    if blocking:  # the doctor's one-shot client: redis-py's own sentinel connections
        kwargs["ssl"] = tls
    else:
        kwargs["connection_class"] = _FollowingSSLConnection if tls else _FollowingConnection
    return kwargs


def where(settings: Settings) -> str:
    """Where Redis is, for messages (no password)."""
    if settings.redis_sentinels:
        return (f"master {settings.redis_sentinel_master!r} of the sentinels "
                f"{','.join(settings.redis_sentinels)}")
    return _redact(settings.redis_url)


def _redact(url: str) -> str:
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


def _master(settings: Settings, sentinel_timeout_s: float, **kwargs: Any) -> aioredis.Redis:
    sentinel = Sentinel(_sentinel_addresses(settings),
                        sentinel_kwargs=_sentinel_kwargs(settings, sentinel_timeout_s, Retry(NoBackoff(), 0)))
    client = sentinel.master_for(settings.redis_sentinel_master, redis_class=_SentinelRedis,
                                 **_master_kwargs(settings), **kwargs)
    client.sentinel = sentinel
    return client


def connect(settings: Settings, max_connections: int | None = None) -> aioredis.Redis:
    """The client every long-running command uses (worker, console, the Slack and Discord adapters).

    The pool is sized for a worker unless ``max_connections`` says otherwise (the Slack adapter's
    burst of acks wants more). No connection opens until the first command; ``aclose()`` closes
    the pool's connections too. With sentinels set, the pool's connections find the master
    through them and follow a failover."""
    size = max_connections or max(32, settings.worker_concurrency * 2 + 16)
    if settings.redis_sentinels:
        return _master(settings, 5.0, connection_pool_class=_BlockingSentinelPool, max_connections=size,
                       timeout=30, retry=retry_policy(), health_check_interval=15, **_client_identity())
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=size, timeout=30,
                                                    retry=retry_policy(), health_check_interval=15,
                                                    **_client_identity())
    return aioredis.Redis.from_pool(pool)


def probe(settings: Settings, timeout: float) -> aioredis.Redis:
    """A client without retries, for health checks: an outage shows now, not after the budget."""
    if settings.redis_sentinels:
        return _master(settings, timeout, retry=Retry(NoBackoff(), 0), socket_connect_timeout=timeout,
                       socket_timeout=timeout)
    return aioredis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0),
                                   socket_connect_timeout=timeout, socket_timeout=timeout)


def sync_client(settings: Settings, timeout: float) -> redis.Redis:
    """A blocking client for ``codeloop doctor``, through the sentinels when they are set."""
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    once = redis.retry.Retry(NoBackoff(), 0)
    sentinel = redis.sentinel.Sentinel(_sentinel_addresses(settings),
                                       sentinel_kwargs=_sentinel_kwargs(settings, timeout, once))
    return sentinel.master_for(settings.redis_sentinel_master, socket_timeout=timeout,
                               socket_connect_timeout=timeout, **_master_kwargs(settings, blocking=True))


async def check(redis: aioredis.Redis, settings: Settings) -> None:
    """Fail with one line that says how to fix it when Redis is not there. The probe doesn't
    retry: at start, a missing Redis is a setup problem to report now, not an outage to wait out."""
    client = probe(settings, 5.0)
    try:
        await client.ping()
    except (aioredis.ConnectionError, OSError) as exc:
        fix = ("Check the sentinels and CODELOOP_REDIS_SENTINEL_MASTER." if settings.redis_sentinels else
               "Start it (`redis-server --daemonize yes`) or set CODELOOP_REDIS_URL.")
        raise QueueError(f"Redis is not reachable at {where(settings)} ({exc}). {fix}") from None
    finally:
        await client.aclose()


async def run_replicated(redis: aioredis.Redis, settings: Settings, script: LuaScript, keys: list[Any],
                         args: list[Any], touch: str, ttl_s: int) -> Any:
    """Run a write script and return once ``CODELOOP_REDIS_MIN_REPLICAS`` replicas have it (WAIT).

    WAIT counts the replicas that acknowledged this connection's last write, so the script, an
    EXPIRE of ``touch`` and the WAIT go in one pipeline on one connection. The EXPIRE is there for
    a resend: the connection lost, the script runs again on a new one and (being idempotent)
    writes nothing, and a WAIT after no write would answer at once; the EXPIRE is a write, and
    the replication stream is ordered, so a replica that has it has the first run's writes too.
    Too few replicas in time raise ``QueueError``: the platform gets no ack and redelivers."""
    wanted = settings.redis_min_replicas
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.expire(touch, ttl_s)
            pipe.wait(wanted, settings.redis_replica_wait_ms)
            reply, _, acked = await pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError) and attempt == 1:  # a new master: load and send again
            await redis.script_load(script.source)
            continue
        break
    for outcome in (reply, acked):
        if isinstance(outcome, Exception):
            raise outcome
    if int(acked) < wanted:
        raise QueueError(f"the write reached {acked} of the {wanted} Redis replicas "
                         f"CODELOOP_REDIS_MIN_REPLICAS asks for within {settings.redis_replica_wait_ms} ms")
    return reply


#: how long a write that must be on a replica before the bot goes on (a reply claim, a render
#: tombstone) waits for one, trying again every REPLICATED_RETRY_S, before it stands on the master alone
REPLICATED_PATIENCE_S = 60.0
REPLICATED_RETRY_S = 0.5


async def run_replicated_patiently(redis: aioredis.Redis, settings: Settings, script: LuaScript, keys: list[Any],
                                   args: list[Any], touch: str, ttl_s: int, what: str) -> Any | None:
    """``run_replicated``, tried again while no replica has it (right after a failover the new
    master's replicas are still syncing), so the caller waits rather than acts on a write a second
    failover could lose. The script's reply, or None after ``REPLICATED_PATIENCE_S`` without a
    replica (logged; the write stands on the master alone: a lasting loss of every replica must not
    stop the bot). ``script`` must be idempotent: it runs again with the same arguments; the
    ``touch`` write gives each WAIT one to count."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + REPLICATED_PATIENCE_S
    while True:
        try:
            return await run_replicated(redis, settings, script, keys, args, touch=touch, ttl_s=ttl_s)
        except QueueError as exc:
            if loop.time() >= give_up:
                log.warning("%s: %s; kept on the master's word", what, exc)
                return None
            log.warning("%s: %s; trying again", what, exc)
            await asyncio.sleep(REPLICATED_RETRY_S)


async def claim_once(redis: aioredis.Redis, key: str, ttl_s: int, token: str | None = None,
                     replicas: int = 0, wait_ms: int = 1000) -> bool:
    """SET NX that survives its own retry: True for the first caller, once per key.

    Our clients resend a command whose reply a Redis restart lost. A plain SET NX run twice answers
    "already set" to the very caller that set it — an event would then count as seen and never be
    rendered. The key holds the caller's ``token`` (unique per call unless given), so a resent SET
    is recognised as ours.

    With ``replicas`` (CODELOOP_REDIS_MIN_REPLICAS) the claim is on that many replicas before it
    is answered: a master that dies right after a reply was rendered cannot take the claim with
    it, so the job's re-run on the new master is not shown a second time. The EXPIRE makes the
    WAIT count after a resend too (see ``run_replicated``). Too few replicas in time: the claim
    stands on the master alone, and a warning says so (rendering goes on)."""
    token = token or uuid.uuid4().hex
    if replicas:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(key, token, nx=True, ex=ttl_s)
            pipe.expire(key, ttl_s)
            pipe.wait(replicas, wait_ms)
            created, _, acked = await pipe.execute()
        if int(acked) < replicas:
            log.warning("claim %s reached %s of %d Redis replicas in %d ms", key, acked, replicas, wait_ms)
    else:
        created = await redis.set(key, token, nx=True, ex=ttl_s)
    if created:
        return True
    holder = await redis.get(key)
    return (holder.decode() if isinstance(holder, bytes) else holder) == token
