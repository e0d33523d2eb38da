"""What the fault benchmarks share: a scripted model server in its own process (so the worker's
RSS is the worker's), a real worker without sandboxes, and a reader of final events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bot.bench.queue import NoSandbox
from bot.core.jobs import Event
from bot.core.settings import Settings
from bot.worker.service import Worker

ROOT = Path(__file__).resolve().parent.parent


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextlib.asynccontextmanager
async def model_server(replies: list[str], fail_every: int = 0) -> AsyncIterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "replies.json")
        await asyncio.to_thread(script.write_text, json.dumps(replies))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fakes.model_server", "--port", str(port), "--script", str(script),
            "--fail-every", str(fail_every),
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
                await asyncio.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            await proc.wait()


def bench_settings(redis_url: str, llm_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"redis_url": redis_url, "key_prefix": f"codeloop-bench-{uuid.uuid4().hex[:8]}",
                            "llm_backend": "tgi", "llm_url": llm_url, "rate_user_per_min": 0,
                            "rate_channel_per_min": 0}
    return Settings.load(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(settings, sandboxes=NoSandbox())  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), timeout=30)
    try:
        yield worker
    finally:
        worker.stop()
        await task
        r = aioredis.from_url(settings.redis_url)
        keys = [k async for k in r.scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def read_finals(redis: aioredis.Redis, stream: str, on_final: Callable[[Event, float], None],
                      stop: asyncio.Event) -> None:
    """Call ``on_final(event, arrival time)`` for each terminal event; trims what it has read so a
    long run doesn't grow Redis."""
    last = "0"
    while not stop.is_set():
        resp = await redis.xread({stream: last}, count=500, block=200)
        now = time.perf_counter()
        for _, entries in resp or []:
            for eid, fields in entries:
                last = eid
                event = Event.loads(fields[b"event"])
                if event.terminal:
                    on_final(event, now)
            await redis.xtrim(stream, minid=last)
