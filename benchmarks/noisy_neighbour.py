"""Noisy neighbours: what quiet users see while others flood the bot. One JSON object per line.

    .venv/bin/python -m benchmarks.noisy_neighbour [--workers 2] [--quiet 8] [--questions 12]   (repo root)

Real Redis, real ``Worker``s (in this process, no sandbox), and a scripted model that takes
``--model-s`` per answer without using the CPU (a GPU's time, as it were). Quiet users each ask in
a thread of their own, one question at a time (closed loop: ask, get the answer, ask again; their
first questions spread over ``--stagger-s``), so their latency (enqueue -> final event) is what a
person sees. Two runs, alternated ``--repeat``
times on the same Redis: ``calm`` (the quiet users alone) and ``attack``, where at the same time

* one user floods ONE thread (a message every ``--flood-every-s``), and
* ``--spammers`` users each flood MANY threads (a message in a new thread every ``--flood-every-s``).

Everyone enqueues the way the adapters do (``limits=True``: the user's pending cap and rate
buckets checked in the enqueue script, refused requests cost nothing more), with the deployment's
defaults unless overridden. ``--no-admission`` enqueues without it, to show the workers' own
fairness (one job in flight per thread, the per-user running cap) alone. Reported: the quiet
users' p50/p99 in each run, their ratio (target: attack p99 within 1.5x of calm), and what the
flood got: requests sent, answered, refused at enqueue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from benchmarks._harness import emit, pct, read_finals
from bot.bench.queue import NoSandbox
from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.llm.base import ChatMessage, GenerationParams, TokenUsage
from bot.queue import redis_conn
from bot.queue.stream import JobQueue
from bot.worker.service import Worker


class SleepyModel:
    """Answers after ``delay_s`` without using the CPU (the model's time, not this box's)."""

    context_tokens = 1 << 20

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def stream_chat(self, messages: list[ChatMessage], params: GenerationParams,
                          usage: TokenUsage | None = None) -> AsyncIterator[str]:
        await asyncio.sleep(self.delay_s)
        yield "The answer is 42."

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return 1

    async def aclose(self) -> None:
        return None


class Run:
    def __init__(self, args: argparse.Namespace, attack: bool) -> None:
        self.args = args
        self.attack = attack
        overrides: dict[str, Any] = {"redis_url": args.redis_url, "llm_backend": "tgi", "llm_url": "http://127.0.0.1:9",
                                     "key_prefix": f"codeloop-noisy-{uuid.uuid4().hex[:8]}",
                                     "worker_concurrency": args.concurrency}
        for name in ("rate_user_per_min", "rate_channel_per_min", "user_pending_max", "worker_user_concurrency"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        self.settings = Settings.load(**overrides)
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.refused = 0
        self.flood_sent = 0
        self.flood_done = 0
        self.flood_ids: set[str] = set()

    def on_final(self, event: Event, now: float) -> None:
        if event.job_id in self.flood_ids and event.type == "final":  # answered (not refused by a worker)
            self.flood_done += 1
        future = self.waiting.pop(event.job_id, None)
        if future is not None and not future.done():
            future.set_result(now)

    def job(self, user: str, thread: str, text: str, channel: str) -> Job:
        return Job(idempotency_key=uuid.uuid4().hex, user=user, text=text, reply_stream=self.stream,
                   conversation=Conversation(platform="bench", workspace="w", channel=channel, thread=thread))

    async def ask(self, queue: JobQueue, user: str, thread: str, text: str) -> float | None:
        job = self.job(user, thread, text, channel=f"quiet-{user}")
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[job.id] = future
        start = time.perf_counter()
        result = await queue.enqueue(job, limits=not self.args.no_admission)
        if not result.created:
            self.waiting.pop(job.id, None)
            self.refused += 1
            return None
        return await future - start

    async def quiet_user(self, queue: JobQueue, n: int) -> list[float]:
        await asyncio.sleep(self.args.stagger_s * n / self.args.quiet)  # people don't all ask at once
        out = []
        for m in range(self.args.questions):
            latency = await self.ask(queue, f"quiet{n}", f"q{n}", f"question {m}")
            if latency is not None:
                out.append(latency)
            await asyncio.sleep(self.args.think_s)
        return out

    async def flooder(self, queue: JobQueue, user: str, one_thread: bool, stop: asyncio.Event) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            thread = f"{user}-flood" if one_thread else f"{user}-{i}"
            job = self.job(user, thread, f"flood {i}", channel="general")
            self.flood_ids.add(job.id)
            result = await queue.enqueue(job, limits=not self.args.no_admission)
            self.flood_sent += 1
            if not result.created:
                self.refused += 1
            await asyncio.sleep(self.args.flood_every_s)

    async def go(self) -> list[float]:
        workers = [Worker(self.settings, model=SleepyModel(self.args.model_s), sandboxes=NoSandbox())  # type: ignore[arg-type]
                   for _ in range(self.args.workers)]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        await asyncio.gather(*(asyncio.wait_for(w.ready.wait(), 30) for w in workers))
        r = redis_conn.connect(self.settings, max_connections=64)
        queue = JobQueue(r, self.settings)
        self.stream = self.settings.key("replies", "bench")
        stop = asyncio.Event()
        reader = asyncio.create_task(read_finals(r, self.stream, self.on_final, stop))
        floods = []
        if self.attack:
            floods.append(asyncio.create_task(self.flooder(queue, "flood-one-thread", True, stop)))
            floods += [asyncio.create_task(self.flooder(queue, f"spammer{i}", False, stop))
                       for i in range(self.args.spammers)]
            await asyncio.sleep(self.args.head_start_s)  # the flood is on before the quiet users ask
        try:
            per_user = await asyncio.gather(*(self.quiet_user(queue, n) for n in range(self.args.quiet)))
        finally:
            stop.set()
            await asyncio.gather(*floods)
            await reader
            for w in workers:
                w.stop()
            await asyncio.gather(*tasks)
            keys = [k async for k in r.scan_iter(match=f"{self.settings.key_prefix}:*", count=1000)]
            for start in range(0, len(keys), 500):
                await r.delete(*keys[start:start + 500])
            await r.aclose()
        return [x for user in per_user for x in user]


async def run(args: argparse.Namespace) -> None:
    calm: list[list[float]] = []
    attack: list[list[float]] = []
    cost: list[tuple[int, int, int]] = []
    for _ in range(args.repeat):  # alternated, so drift on a shared machine hits both alike
        calm.append(await Run(args, attack=False).go())
        hostile = Run(args, attack=True)
        attack.append(await hostile.go())
        cost.append((hostile.flood_sent, hostile.flood_done, hostile.refused))
    common = {"workers": args.workers, "worker_concurrency": args.concurrency, "quiet_users": args.quiet,
              "questions": args.questions, "spammers": args.spammers, "model_s": args.model_s,
              "admission": not args.no_admission, "runs": args.repeat}
    figures: dict[str, float] = {}
    for name, runs in (("calm", calm), ("attack", attack)):
        figures[f"{name}_p50"] = statistics.median(statistics.median(x) for x in runs) * 1e3
        figures[f"{name}_p99"] = statistics.median(pct(x, 0.99) for x in runs) * 1e3
        emit(f"quiet_latency_p50_{name}", figures[f"{name}_p50"], "ms", **common)
        emit(f"quiet_latency_p99_{name}", figures[f"{name}_p99"], "ms", **common)
    emit("quiet_p50_attack_over_calm", figures["attack_p50"] / figures["calm_p50"], "ratio", **common)
    emit("quiet_p99_attack_over_calm", figures["attack_p99"] / figures["calm_p99"], "ratio", target=1.5, **common)
    sent, done, refused = (statistics.median(c[i] for c in cost) for i in range(3))
    emit("flood_requests_sent", sent, "requests", **common)
    emit("flood_jobs_answered", done, "jobs", **common)
    emit("flood_refused_at_enqueue", refused, "requests", **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="job slots per worker")
    parser.add_argument("--quiet", type=int, default=8, help="quiet users, one thread each")
    parser.add_argument("--questions", type=int, default=12, help="questions per quiet user, one after another")
    parser.add_argument("--think-s", type=float, default=0.05, help="a quiet user's pause between questions")
    parser.add_argument("--stagger-s", type=float, default=1.0, help="quiet users start spread over this long")
    parser.add_argument("--model-s", type=float, default=0.25, help="the model's time per answer")
    parser.add_argument("--spammers", type=int, default=3, help="users flooding many threads")
    parser.add_argument("--flood-every-s", type=float, default=0.02, help="each flooder's gap between messages")
    parser.add_argument("--head-start-s", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-admission", action="store_true", help="enqueue without the adapters' limits")
    for name in ("rate_user_per_min", "rate_channel_per_min", "user_pending_max", "worker_user_concurrency"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override CODELOOP_{name.upper()} (default: the deployment default)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
