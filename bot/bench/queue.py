"""``codeloop bench queue``: the whole queue path vs a raw redis-py stream loop, same run.

Whole path: idempotent enqueue -> pickup -> turn/lock -> status + final events -> ack, through
the real ``Worker`` with a no-op agent (a model that answers "ok" without code, so no sandbox).
Raw: XADD / XREADGROUP / XACK with the same number of producers. One JSON object per line.

``--consumer same`` (the default) runs the worker and the raw consumer in the producers' process,
so both sides share one core's event loop; ``own`` puts each in a process of its own, as adapters
and workers are deployed, and shows what one worker process sustains.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Job
from bot.core.settings import Settings
from bot.llm.base import ChatMessage, GenerationParams, TokenUsage
from bot.queue.stream import JobQueue
from bot.worker.service import Worker

_SPAWN = multiprocessing.get_context("spawn")


class NoopModel:
    context_tokens = 1 << 20

    async def stream_chat(self, messages: list[ChatMessage], params: GenerationParams,
                          usage: TokenUsage | None = None) -> AsyncIterator[str]:
        yield "ok"

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return 1

    async def aclose(self) -> None:
        return None


class NoSandbox:
    """The no-op agent never runs code; using a sandbox here would be a benchmark bug."""

    async def start(self) -> None:
        return None

    async def acquire(self, session_id: str | None, label: str) -> Any:
        raise AssertionError("no-op agent asked for a sandbox")

    async def destroy(self, session_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def _bench_settings(url: str, prefix: str, concurrency: int) -> Settings:
    # one bench user in one channel: rate limits and the per-user cap would measure themselves, not the queue
    return Settings.load(redis_url=url, key_prefix=prefix, llm_backend="tgi", llm_url="http://127.0.0.1:9",
                         worker_concurrency=concurrency, rate_user_per_min=0, rate_channel_per_min=0,
                         worker_user_concurrency=concurrency)


async def _raw_consume(r: aioredis.Redis, stream: str, jobs: int) -> list[float]:
    latencies: list[float] = []
    seen = 0
    while seen < jobs:
        resp = await r.xreadgroup("g", "c", {stream: ">"}, count=64, block=1000)
        now = time.time()
        for _, entries in resp or []:
            for eid, fields in entries:
                latencies.append(now - float(fields[b"t"]))
                await r.xack(stream, "g", eid)
                seen += 1
    return latencies


def _raw_consumer_process(url: str, stream: str, jobs: int, conn: Connection) -> None:
    async def main() -> None:
        r = aioredis.from_url(url)
        await r.ping()
        conn.send("ready")
        conn.send(await _raw_consume(r, stream, jobs))
        await r.aclose()

    asyncio.run(main())


async def raw_loop(url: str, producers: int, jobs: int, split: bool = False) -> tuple[float, list[float]]:
    """The floor: XADD by N producers, one XREADGROUP consumer that XACKs each entry (in this
    process, or with ``split`` in a process of its own)."""
    r = aioredis.from_url(url)
    stream = f"codeloop-bench-raw:{uuid.uuid4().hex}"
    await r.xgroup_create(stream, "g", id="0", mkstream=True)
    per = jobs // producers

    async def produce() -> None:
        for _ in range(per):
            await r.xadd(stream, {"t": repr(time.time())})

    if split:
        ours, theirs = multiprocessing.Pipe()
        proc = _SPAWN.Process(target=_raw_consumer_process, args=(url, stream, per * producers, theirs), daemon=True)
        proc.start()
        await asyncio.to_thread(ours.recv)  # ready
        start = time.perf_counter()
        await asyncio.gather(*(produce() for _ in range(producers)))
        latencies: list[float] = await asyncio.to_thread(ours.recv)
        elapsed = time.perf_counter() - start
        proc.join(10)
    else:
        start = time.perf_counter()
        consuming = asyncio.create_task(_raw_consume(r, stream, per * producers))
        await asyncio.gather(*(produce() for _ in range(producers)))
        latencies = await consuming
        elapsed = time.perf_counter() - start
    await r.delete(stream)
    await r.aclose()
    return per * producers / elapsed, latencies


def _worker_process(url: str, prefix: str, concurrency: int, conn: Connection) -> None:
    """A worker (no-op agent) in a process of its own, as deployed; sends its pickup latencies at exit."""
    async def main() -> None:
        latencies: list[float] = []
        worker = Worker(_bench_settings(url, prefix, concurrency), model=NoopModel(),
                        sandboxes=NoSandbox())  # type: ignore[arg-type]
        worker.pickup_observer = latencies.append
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
        task = asyncio.create_task(worker.run())
        await worker.ready.wait()
        conn.send("ready")
        await task
        conn.send(latencies)

    asyncio.run(main())


async def whole_path(url: str, producers: int, jobs: int, concurrency: int,
                     split: bool = False) -> tuple[float, list[float]]:
    """Idempotent enqueue by N producers through a real ``Worker`` with a no-op agent, to the last
    ack (the worker in this process, or with ``split`` in a process of its own)."""
    prefix = f"codeloop-bench-{uuid.uuid4().hex[:8]}"
    settings = _bench_settings(url, prefix, concurrency)
    latencies: list[float] = []
    if split:
        ours, theirs = multiprocessing.Pipe()
        proc = _SPAWN.Process(target=_worker_process, args=(url, prefix, concurrency, theirs), daemon=True)
        proc.start()
        await asyncio.to_thread(ours.recv)  # ready
    else:
        worker = Worker(settings, model=NoopModel(), sandboxes=NoSandbox())  # type: ignore[arg-type]
        worker.pickup_observer = latencies.append
        worker_task = asyncio.create_task(worker.run())
        await worker.ready.wait()
    r = aioredis.from_url(url)
    queue = JobQueue(r, settings)
    reply = settings.key("replies", "bench")
    per = jobs // producers

    async def produce(p: int) -> None:
        for i in range(per):
            job = Job(idempotency_key=f"{p}-{i}", user="u", reply_stream=reply, text="hi",
                      conversation=Conversation(platform="bench", channel="c", thread=f"{p}-{i % 50}"))
            await queue.enqueue(job)

    start = time.perf_counter()
    await asyncio.gather(*(produce(p) for p in range(producers)))
    while True:  # every job enqueued: done once none is undelivered or unacked
        if not split and len(latencies) < per * producers:
            await asyncio.sleep(0.002)
            continue
        depth = await queue.depth()
        if not depth["lag"] and not depth["pending"]:
            break
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - start
    finals = sum(1 for _, f in await r.xrange(reply) if b'"type":"final"' in f[b"event"])
    if split:
        proc.terminate()  # SIGTERM: the worker drains and reports
        latencies = await asyncio.to_thread(ours.recv)
        proc.join(10)
    else:
        worker.stop()
        await worker_task
    keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
    await r.delete(*keys)
    await r.aclose()
    if finals != per * producers:
        raise RuntimeError(f"expected {per * producers} final events, saw {finals}")
    return per * producers / elapsed, latencies


async def run(args: argparse.Namespace) -> None:
    for split, producers in itertools.product(args.split, args.producers):
        raw_rates: list[float] = []
        rates: list[float] = []
        raw_lat: list[list[float]] = []
        lat: list[list[float]] = []
        for _ in range(args.repeat):  # alternated, so drift on a shared machine hits both alike
            raw_rate, raw_l = await raw_loop(args.redis_url, producers, args.jobs, split)
            rate, l_ = await whole_path(args.redis_url, producers, args.jobs, args.concurrency, split)
            raw_rates.append(raw_rate)
            rates.append(rate)
            raw_lat.append(raw_l)
            lat.append(l_)
        raw_rate, rate = statistics.median(raw_rates), statistics.median(rates)
        common = {"producers": producers, "jobs": args.jobs, "runs": args.repeat,
                  "consumer": "own process" if split else "same process"}
        emit("raw_stream_jobs_per_s", raw_rate, "jobs/s", runs_values=[round(r) for r in raw_rates],
             **common)
        emit("queue_jobs_per_s", rate, "jobs/s", baseline=round(raw_rate, 1), ratio=round(rate / raw_rate, 3),
             runs_values=[round(r) for r in rates], **common)
        raw_p50 = statistics.median(statistics.median(x) for x in raw_lat) * 1e3
        raw_p99 = statistics.median(_pct(x, 0.99) for x in raw_lat) * 1e3
        emit("raw_enqueue_to_pickup_p50", raw_p50, "ms", **common)
        emit("queue_enqueue_to_pickup_p50", statistics.median(statistics.median(x) for x in lat) * 1e3, "ms",
             baseline=round(raw_p50, 3), **common)
        emit("queue_enqueue_to_pickup_p99", statistics.median(_pct(x, 0.99) for x in lat) * 1e3, "ms",
             baseline=round(raw_p99, 3), **common)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--producers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                        help="comma-separated producer counts (default 1,8)")
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64, help="worker job slots")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each loop, alternated; medians reported")
    parser.add_argument("--consumer", choices=["same", "own", "both"], default="same",
                        help="the worker (and the raw consumer) in the producers' process, in a process of "
                             "its own as deployed, or both one after the other (default same)")


def main(args: argparse.Namespace) -> int:
    args.split = {"same": [False], "own": [True], "both": [False, True]}[args.consumer]
    asyncio.run(run(args))
    return 0
