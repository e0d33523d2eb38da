"""``codeloop bench replies``: what render leases cost on the reply path (adapter side).

A burst of J jobs x E events is put on a reply stream, then read to the end by:
  * ``plain``: the consumer-group reader (``ReplyReader``, one claim per event) one replica uses;
  * ``leased``: ``LeasedReader`` (route in stream order, renew, per-job streams), the renderer
    committing its state every ``--commit-every`` events (Slack's renderer commits once per
    flush, at most one a second per job, so 1 is the worst case), with 1 and with 2 replicas.
The handler does no platform work, so the figures are the Redis path alone. Prints one JSON
object per line: events/s and Redis round trips per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event
from bot.core.settings import Settings
from bot.queue.render_lease import LeasedReader, RenderLeases
from bot.queue.replies import ReplyReader, reply_stream


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=200, help="jobs in the burst (default 200)")
    parser.add_argument("--events", type=int, default=20, help="events per job, the last one final (default 20)")
    parser.add_argument("--commit-every", type=int, default=1, help="leased: events per state commit (default 1)")
    parser.add_argument("--redis-url", help="Redis to use (default CODELOOP_REDIS_URL)")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_bench(args))


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"bench": "replies", "name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


class _Counting(aioredis.Redis):  # type: ignore[misc]
    """Counts round trips: each command or pipeline sent."""

    trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        _Counting.trips += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        _Counting.trips += 1
        return super().pipeline(transaction, shard_hint)


async def _burst(redis: aioredis.Redis, settings: Settings, jobs: int, events: int) -> list[str]:
    conv = Conversation(platform="slack", workspace="T", channel="C", thread="1.0")
    stream = reply_stream(settings, "bench")
    ids = [uuid.uuid4().hex for _ in range(jobs)]
    for seq in range(1, events + 1):
        async with redis.pipeline(transaction=False) as pipe:
            for job in ids:
                kind = "final" if seq == events else "delta"
                pipe.xadd(stream, {"event": Event(job_id=job, conversation=conv, seq=seq, type=kind,  # type: ignore[arg-type]
                                                  payload={"text": "x" * 40}).dumps()})
            await pipe.execute()
    return ids


async def _plain(redis: aioredis.Redis, settings: Settings, total: int) -> tuple[float, int]:
    reader = ReplyReader(redis, settings, "bench", consumer="plain")
    await reader.ensure_group()
    got = 0
    stop = asyncio.Event()

    async def handle(_: Event) -> None:
        nonlocal got
        got += 1
        if got == total:
            stop.set()

    _Counting.trips = 0
    t0 = time.perf_counter()
    await reader.run(handle, stop, block_ms=50)
    return time.perf_counter() - t0, _Counting.trips


async def _leased(redis: aioredis.Redis, settings: Settings, total: int, replicas: int,
                  commit_every: int) -> tuple[float, int]:
    got = 0
    stop = asyncio.Event()

    def renderer(leases: RenderLeases) -> Any:
        pending: dict[str, list[str]] = {}

        async def deliver(event: Event, entry: str) -> None:
            nonlocal got
            applied = pending.setdefault(event.job_id, [])
            applied.append(entry)
            if event.terminal:
                await leases.finish(event.job_id)
            elif len(applied) >= commit_every:
                await leases.commit(event.job_id, applied, f'{{"seq":{event.seq}}}')
                applied.clear()
            got += 1
            if got == total:
                stop.set()
        return deliver

    readers = []
    for r in range(replicas):
        leases = RenderLeases(redis, settings, "bench", replica=f"r{r}")
        readers.append(LeasedReader(leases, block_ms=50).run(renderer(leases), stop))
    _Counting.trips = 0
    t0 = time.perf_counter()
    await asyncio.gather(*readers)
    return time.perf_counter() - t0, _Counting.trips


async def _bench(args: argparse.Namespace) -> int:
    base = Settings.load(**({"redis_url": args.redis_url} if args.redis_url else {}))
    total = args.jobs * args.events
    for name, replicas in (("plain", 1), ("leased", 1), ("leased", 2)):
        settings = base.model_copy(update={"key_prefix": f"bench-replies-{uuid.uuid4().hex[:8]}"})
        redis = _Counting.from_url(settings.redis_url)
        try:
            await _burst(redis, settings, args.jobs, args.events)
            if name == "plain":
                elapsed, trips = await _plain(redis, settings, total)
            else:
                elapsed, trips = await _leased(redis, settings, total, replicas, args.commit_every)
            extra = {"jobs": args.jobs, "events": total, "replicas": replicas}
            if name == "leased":
                extra["commit_every"] = args.commit_every
            emit(f"{name}_events_per_s", total / elapsed, "events/s", **extra)
            emit(f"{name}_round_trips_per_event", trips / total, "round trips", **extra)
        finally:
            keys = [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()
    return 0
