"""200 conversations at once through a real worker and a fast scripted model server: throughput
and latency (enqueue -> final event), one JSON object per line.

    .venv/bin/python -m benchmarks.fairness [--conversations 200] [--messages 5]   (from the repo root)

Each conversation is a user who sends a message, waits for the answer, and sends the next one
(closed loop), so latency is what a person in a thread would see. Replies are text without code:
200 real sandboxes would be 200 containers, more than this 2-core box runs. A heavy user (a
script sending ``--heavy`` messages at once into as many threads) runs alongside; with the
per-user cap it holds at most ``worker_user_concurrency`` slots, and the figures show whether
everyone else's p99 stays put. Rate limits are off (a benchmark, not a chat).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks._harness import bench_settings, emit, model_server, pct, read_finals, running_worker
from bot.core.jobs import Conversation, Event, Job
from bot.queue import redis_conn
from bot.queue.stream import JobQueue


async def run(args: argparse.Namespace) -> None:
    async with model_server(["Here you go: the answer is 42, as computed."]) as url:
        settings = bench_settings(args.redis_url, url, worker_concurrency=args.concurrency)
        async with running_worker(settings):
            r = redis_conn.connect(settings, max_connections=64)  # blocking pool: 400 askers share it
            queue = JobQueue(r, settings)
            stream = settings.key("replies", "bench")
            waiting: dict[str, asyncio.Future[float]] = {}

            def on_final(event: Event, now: float) -> None:
                future = waiting.pop(event.job_id, None)
                if future is not None and not future.done():
                    future.set_result(now)

            async def ask(user: str, thread: str, text: str) -> float:
                channel = f"c{sum(map(ord, thread)) % 20}"
                job = Job(idempotency_key=f"{thread}-{text}", user=user, text=text, reply_stream=stream,
                          conversation=Conversation(platform="bench", channel=channel, thread=thread))
                future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                waiting[job.id] = future
                start = time.perf_counter()
                await queue.enqueue(job)
                return await future - start

            async def conversation(n: int) -> list[float]:
                return [await ask(f"user{n}", f"t{n}", f"question {m}") for m in range(args.messages)]

            stop = asyncio.Event()
            reader = asyncio.create_task(read_finals(r, stream, on_final, stop))
            t0 = time.perf_counter()
            heavy = [asyncio.create_task(ask("heavy", f"h{i}", "flood")) for i in range(args.heavy)]
            per_conv = await asyncio.gather(*(conversation(n) for n in range(args.conversations)))
            elapsed = time.perf_counter() - t0
            heavy_lat = await asyncio.gather(*heavy)
            stop.set()
            await reader
            await r.aclose()

    lat = [x for conv in per_conv for x in conv]
    common = {"conversations": args.conversations, "messages": args.messages, "heavy": args.heavy,
              "worker_concurrency": args.concurrency}
    emit("fairness_jobs_per_s", len(lat) / elapsed, "jobs/s", **common)
    emit("fairness_latency_p50", statistics.median(lat) * 1e3, "ms", **common)
    emit("fairness_latency_p99", pct(lat, 0.99) * 1e3, "ms", **common)
    emit("fairness_latency_max", max(lat) * 1e3, "ms", **common)
    # Jain's index over each conversation's mean latency: 1.0 = everyone served alike
    means = [statistics.mean(c) for c in per_conv]
    emit("fairness_jain_index", sum(means) ** 2 / (len(means) * sum(m * m for m in means)), "ratio", **common)
    if heavy_lat:
        emit("heavy_user_latency_p50", statistics.median(heavy_lat) * 1e3, "ms", **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5, help="messages per conversation, one after another")
    parser.add_argument("--heavy", type=int, default=200, help="messages the heavy user sends at once")
    parser.add_argument("--concurrency", type=int, default=16, help="worker job slots")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
