"""Worker memory over many jobs: 10,000 jobs through a real worker and a fast scripted model
server (its own process), worker RSS printed every 1,000 jobs, one JSON object per line.

    .venv/bin/python -m benchmarks.overload_rss [--jobs 10000] [--redis-url URL]   (from the repo root)

The worker, the producer and the final-event reader share this process; the producer keeps at
most ``--window`` jobs in flight, so what grows is the worker's, not a backlog. The model server
is overloaded: every ``--fail-every``-th request gets a 429 or a 503, so the retry-with-backoff
path runs hundreds of times. One user sends every 50th job under a 30-a-minute limit, so the
rate-limit error path is in the figures too.
The slope between the second and the last sample is the figure to watch: the first 1,000 jobs
include warm-up (imports, pools, caches).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import redis.asyncio as aioredis

from benchmarks._harness import bench_settings, emit, model_server, read_finals, rss_mib, running_worker
from bot.core.jobs import Conversation, Event, Job
from bot.queue.stream import JobQueue


async def run(args: argparse.Namespace) -> None:
    async with model_server(["Sure, here is the answer: 42."], fail_every=args.fail_every) as url:
        # one user in 50 is limited to 30 a minute, so some jobs end in a rate-limit error
        settings = bench_settings(args.redis_url, url, worker_concurrency=16, worker_user_concurrency=16,
                                  rate_user_per_min=30, llm_backoff_s=0.05)
        async with running_worker(settings):
            r = aioredis.from_url(args.redis_url)
            queue = JobQueue(r, settings)
            stream = settings.key("replies", "bench")
            outcomes: dict[str, int] = {}
            window = asyncio.Semaphore(args.window)

            def on_final(event: Event, _: float) -> None:
                kind = event.payload.get("kind", "ok") if event.type == "error" else "ok"
                outcomes[kind] = outcomes.get(kind, 0) + 1
                window.release()

            stop = asyncio.Event()
            reader = asyncio.create_task(read_finals(r, stream, on_final, stop))
            emit("worker_rss", rss_mib(), "MiB", jobs=0)
            t0 = time.perf_counter()
            for i in range(args.jobs):
                await window.acquire()
                user = "spammer" if i % 50 == 0 else f"u{i % 200}"
                await queue.enqueue(Job(idempotency_key=f"e{i}", user=user, text=f"question {i}", reply_stream=stream,
                                        conversation=Conversation(platform="bench", channel=f"c{i % 20}",
                                                                  thread=f"t{i % 500}")))
                if (i + 1) % args.every == 0:
                    while sum(outcomes.values()) < i + 1 - args.window:
                        await asyncio.sleep(0.01)
                    gc.collect()
                    emit("worker_rss", rss_mib(), "MiB", jobs=i + 1, jobs_per_s=round((i + 1) / (time.perf_counter()
                                                                                              - t0), 1))
            while sum(outcomes.values()) < args.jobs:
                await asyncio.sleep(0.01)
            stop.set()
            await reader
            await r.aclose()
            gc.collect()
            emit("worker_rss_final", rss_mib(), "MiB", jobs=args.jobs, outcomes=outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--window", type=int, default=64, help="jobs in flight")
    parser.add_argument("--fail-every", type=int, default=7, help="every Nth model request fails (429/503)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
