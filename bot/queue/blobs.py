"""File bytes outside the streams: blob keys with a TTL and a per-job budget, and the guard that
keeps Redis below its ``maxmemory``.

    blob:<job id>:<n>   the bytes of the n-th image or file a job made (TTL ``blob_ttl_s``)

A job's images and files never travel inside an event: the worker writes each one to a blob key
before it publishes the event that names it (``{"blob": key, "name", "size", "mime"}``), and the
adapter takes it (GETDEL: fetched and deleted in one step; the reply reader renders an event
once) and uploads it. A blob no adapter ever takes expires with its TTL. A job may hand back
``blob_job_bytes`` in all; a file past that, or one that would take Redis past the shed line, is
named in the event (``"skipped"``: why) and not sent.

``MemoryGuard`` reads ``INFO memory`` every few seconds. Past ``redis_shed_ratio`` of
``maxmemory`` the worker refuses new jobs and files with a message the user can act on, before
Redis (``maxmemory-policy noeviction``) would refuse the writes that finish running jobs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from bot.core.errors import ServiceBusy
from bot.core.settings import Settings

log = logging.getLogger(__name__)

#: how often the guard reads INFO memory (one cheap command per worker)
CHECK_S = 2.0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def inline_bytes(payload: dict[str, Any]) -> bytes | None:
    """The inline base64 file of an image/file payload (workers older than blobs, direct callers);
    None when there is none or it is damaged."""
    raw = payload.get("data_b64")
    if raw is None:
        return None
    try:
        return base64.b64decode(str(raw), validate=True) or None
    except (binascii.Error, ValueError):
        return None


class BlobStore:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = settings.key("blob") + ":"

    def key(self, job_id: str, n: int) -> str:
        return self.settings.key("blob", job_id, str(n))

    async def put(self, key: str, data: bytes) -> None:
        await self.redis.set(key, data, ex=self.settings.blob_ttl_s)

    async def take(self, key: str) -> bytes | None:
        """The blob's bytes, deleted from Redis in the same step; None when it expired (or the
        key is not a blob of this deployment: an event never makes an adapter read other keys)."""
        if not key.startswith(self.prefix):
            log.warning("refusing to read %r: not a blob key", key)
            return None
        data = await self.redis.getdel(key)
        return bytes(data) if data is not None else None

    async def payload_bytes(self, payload: dict[str, Any]) -> bytes | None:
        """The file an image/file event brings: its blob (taken), or inline base64 from a worker
        older than blobs. None when there is none (expired, skipped, damaged)."""
        ref = payload.get("blob")
        if isinstance(ref, str):
            return await self.take(ref)
        return inline_bytes(payload)


def missing_note(payload: dict[str, Any]) -> str:
    """What to tell the user about a file event that brought no bytes."""
    name = str(payload.get("name") or "file")
    if payload.get("skipped"):
        return f"`{name}` was not sent: {payload['skipped']}"
    return f"`{name}` expired before it could be shown; run the code again to get it."


class MemoryGuard:
    """Redis's memory use against its ``maxmemory``, refreshed every ``CHECK_S`` by ``run``."""

    def __init__(self, redis: aioredis.Redis, ratio: float) -> None:
        self.redis = redis
        self.ratio = ratio
        self.used = 0
        self.limit = 0  # maxmemory; 0 = none set (never sheds)

    @property
    def line(self) -> float:
        return self.limit * self.ratio

    @property
    def shedding(self) -> bool:
        return self.limit > 0 and self.used >= self.line

    def reserve(self, nbytes: int) -> bool:
        """Room for ``nbytes`` more below the shed line? Counts them as used until the next check,
        so the writes between two checks can't overshoot together."""
        if self.limit <= 0:
            return True
        if self.used + nbytes >= self.line:
            return False
        self.used += nbytes
        return True

    async def check(self) -> None:
        info = await self.redis.info("memory")
        self.used = int(info.get("used_memory", 0))
        self.limit = int(info.get("maxmemory", 0))

    async def run(self) -> None:
        was = False
        while True:
            try:
                await self.check()
            except (RedisError, OSError) as exc:
                log.debug("memory check failed: %s", exc)
            if self.shedding != was:
                was = self.shedding
                log.warning("Redis memory %s of %s: %s", _mb(self.used), _mb(self.limit),
                            "shedding new jobs and files" if was else "taking jobs again")
            await asyncio.sleep(CHECK_S)


class JobBlobs:
    """One job's files on their way to blob keys, within the job's byte budget."""

    def __init__(self, store: BlobStore, guard: MemoryGuard | None, job_id: str) -> None:
        self.store = store
        self.guard = guard
        self.job_id = job_id
        self.budget = store.settings.blob_job_bytes
        self.used = 0
        self.count = 0

    async def stash(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An image/file payload with inline data -> the same payload naming a blob instead (or
        saying why the file was not sent)."""
        raw = payload.get("data_b64")
        data = raw if isinstance(raw, bytes) else base64.b64decode(str(raw or ""))
        out = {k: v for k, v in payload.items() if k != "data_b64"}
        out.setdefault("size", len(data))
        out.setdefault("mime", "application/octet-stream")
        if self.used + len(data) > self.budget:
            out["skipped"] = (f"this answer's files are over the {_mb(self.budget)} limit "
                              f"({_mb(len(data))} more would make {_mb(self.used + len(data))}).")
            return out
        if self.guard is not None and not self.guard.reserve(len(data)):
            out["skipped"] = ServiceBusy().user_message()
            return out
        self.count += 1
        key = self.store.key(self.job_id, self.count)
        try:
            await self.store.put(key, data)
        except ResponseError as exc:  # OOM under noeviction: Redis is full after all
            log.warning("blob %s refused by Redis: %s", key, exc)
            out["skipped"] = ServiceBusy().user_message()
            return out
        self.used += len(data)
        out["blob"] = key
        return out
