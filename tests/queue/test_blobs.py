"""File bytes never live in the streams: a job's files go through blob keys that the adapter takes
once shown, rendered reply entries are deleted, and a worker sheds new jobs before Redis would
refuse writes. Measured on a Redis of our own (nothing else writes to it)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.adapters.console import Console
from bot.bench.queue import NoSandbox
from bot.core.errors import ServiceBusy
from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.blobs import BlobStore, JobBlobs, MemoryGuard
from bot.queue.replies import ReplyReader
from bot.queue.stream import JobQueue
from bot.worker.service import Worker
from runner.config import SandboxConfig
from runner.manager import SandboxManager
from tests.conftest import RunningWorkers, _remove_test_containers
from tests.faults.conftest import RedisServer

FILES, FILE_BYTES = 10, 10_000_000
WRITE_FILES = f"""I'll write the files.
```python
import random
for i in range({FILES}):
    with open(f"/mnt/data/part-{{i}}.bin", "wb") as f:
        f.write(random.Random(i).randbytes({FILE_BYTES}))
print("wrote {FILES} files")
```"""


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def own_client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def used_memory(redis: aioredis.Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def prefix_bytes(redis: aioredis.Redis, prefix: str) -> int:
    """MEMORY USAGE summed over every key of the deployment (streams, blobs, state, claims)."""
    total = 0
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        total += int(await redis.memory_usage(key, samples=0) or 0)
    return total


class Recorder(Console):
    """The real console (its reader takes blobs and deletes what it rendered); events kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[Event] = []
        render = self.renderer.render

        def keep(event: Event, data: bytes | None = None) -> None:
            self.events.append(event)
            render(event, data)

        self.renderer.render = keep  # type: ignore[method-assign]


async def test_a_jobs_100_mb_of_files_leave_almost_nothing_in_redis_once_rendered(
        own_redis: RedisServer, own_client: aioredis.Redis, make_settings: Any, model_server: Any,
        key_prefix: str, tmp_path: Path) -> None:
    """One job writes 10 x 10 MB files through a real worker and a real sandbox; the console
    shows them. Before blobs, ~147 MB stayed in Redis after the job was rendered and acknowledged."""
    model_server.script = [WRITE_FILES, "Done: ten files."]
    settings: Settings = make_settings(
        redis_url=own_redis.url, llm_url=model_server.url, sandbox_cell_timeout_s=120,
        sandbox_max_total_file_bytes=128 * 1024 * 1024, sandbox_data_size="160m", sandbox_memory="1g",
        blob_job_bytes=128 * 1024 * 1024)
    workers = RunningWorkers()
    manager = SandboxManager(SandboxConfig.from_settings(settings, labels={"codeloop.test": key_prefix}))
    try:
        await workers.start(Worker(settings, sandboxes=manager), within_s=60)
        before = await used_memory(own_client)
        console = Recorder(settings, None, tmp_path, interactive=False)
        await console.connect()
        try:
            await asyncio.wait_for(console.send("write ten 10 MB files"), timeout=300)
            after = await used_memory(own_client)
            left = await prefix_bytes(own_client, key_prefix)
        finally:
            await console.close()
    finally:
        await workers.stop()
        await asyncio.to_thread(_remove_test_containers, key_prefix)
    files = [e for e in console.events if e.type == "file"]
    assert len(files) == FILES and all("data_b64" not in e.payload and e.payload["blob"] for e in files)
    saved = sorted((tmp_path / console.conversation.thread).glob("part-*.bin"))
    assert [p.name for p in saved] == sorted(f"part-{i}.bin" for i in range(FILES))
    import random

    for path in saved:
        i = int(path.stem.split("-")[1])
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(
            random.Random(i).randbytes(FILE_BYTES)).digest()
    print(f"\nRedis used_memory {before / 1e6:.1f} MB before the job, {after / 1e6:.1f} MB once rendered; "
          f"keys of the deployment: {left / 1e3:.1f} kB")
    assert after - before < 30e6 and left < 30e6
    assert not [k async for k in own_client.scan_iter(match=f"{key_prefix}:blob:*")]
    assert await own_client.xlen(settings.key("jobs")) == 0


async def test_rendered_reply_entries_are_deleted_and_claims_stay_small(
        redis_client: aioredis.Redis, settings: Settings) -> None:
    queue = JobQueue(redis_client, settings)
    reader = ReplyReader(redis_client, settings, "t", consumer="r")
    await reader.ensure_group()
    conv = Conversation(platform="test", channel="c", thread="t")
    events = [Event(job_id="j", conversation=conv, seq=i, type="delta", payload={"text": "x" * 100})
              for i in range(1, 50)]
    events.append(Event(job_id="j", conversation=conv, seq=50, type="final", payload={"text": "done"}))
    await queue.publish_many(reader.stream, [e.dumps() for e in events])
    seen: list[int] = []
    stop = asyncio.Event()

    async def handler(event: Event) -> None:
        seen.append(event.seq)
        if event.terminal:
            stop.set()

    await reader.run(handler, stop, block_ms=50)
    assert seen == list(range(1, 51))
    assert await redis_client.xlen(reader.stream) == 0
    claims = [k async for k in redis_client.scan_iter(match=settings.key("rendered", "*"))]
    assert len(claims) == 1  # one small hash per job, not a key per event
    assert int(await redis_client.memory_usage(claims[0]) or 0) < 2000


async def test_files_past_the_jobs_budget_are_named_not_sent(
        redis_client: aioredis.Redis, make_settings: Any) -> None:
    settings: Settings = make_settings(blob_job_bytes=3000)
    store = BlobStore(redis_client, settings)
    files = JobBlobs(store, None, "job1")
    first = await files.stash({"name": "a.bin", "mime": "application/octet-stream", "data_b64": b"a" * 2000})
    second = await files.stash({"name": "b.bin", "mime": "application/octet-stream", "data_b64": b"b" * 2000})
    assert "data_b64" not in first and await store.take(first["blob"]) == b"a" * 2000
    assert await redis_client.exists(first["blob"]) == 0  # taken = deleted
    assert "blob" not in second and "over the 0.0 MB limit" in second["skipped"]
    assert await store.take(settings.key("conv", "x")) is None  # never reads a key that is not a blob


async def test_a_worker_sheds_new_jobs_near_maxmemory_and_takes_them_again_after(
        own_redis: RedisServer, own_client: aioredis.Redis, make_settings: Any, model_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.queue import blobs

    monkeypatch.setattr(blobs, "CHECK_S", 0.2)
    model_server.script = ["fine"]
    await own_client.config_set("maxmemory", str(64 * 1024 * 1024))
    await own_client.config_set("maxmemory-policy", "noeviction")
    settings: Settings = make_settings(redis_url=own_redis.url, llm_url=model_server.url, redis_shed_ratio=0.5)
    workers = RunningWorkers()
    worker = await workers.start(Worker(settings, sandboxes=NoSandbox()), within_s=30)  # type: ignore[arg-type]
    try:
        ballast = [settings.key("ballast", str(i)) for i in range(40)]
        for key in ballast:  # ~40 MB: past the shed line (32 MB), below maxmemory
            await own_client.set(key, b"z" * 1_000_000)
        await wait_for(lambda: worker.memory.shedding)
        queue = JobQueue(own_client, settings)
        reply = settings.key("replies", "t")
        conv = Conversation(platform="test", channel="c", thread="t")
        await queue.enqueue(Job(idempotency_key="one", user="u", text="hi", reply_stream=reply, conversation=conv))
        [shed] = await finals(own_client, reply, 1)
        assert shed.type == "error" and shed.payload["kind"] == "shed"
        assert shed.payload["message"] == ServiceBusy.generic and not model_server.requests
        await own_client.delete(*ballast)
        await wait_for(lambda: not worker.memory.shedding)
        await queue.enqueue(Job(idempotency_key="two", user="u", text="hi", reply_stream=reply, conversation=conv))
        second = (await finals(own_client, reply, 2))[1]
        assert second.type == "final" and second.payload["text"] == "fine"
    finally:
        await workers.stop()


async def test_the_guard_counts_writes_between_checks(own_client: aioredis.Redis) -> None:
    await own_client.config_set("maxmemory", str(100 * 1024 * 1024))
    guard = MemoryGuard(own_client, 0.9)
    await guard.check()
    room = int(guard.line - guard.used)
    assert guard.reserve(room // 2) and not guard.reserve(room // 2 + 1)  # the first counts until the next check


async def wait_for(condition: Any, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def finals(redis: aioredis.Redis, stream: str, count: int, within_s: float = 30) -> list[Event]:
    deadline = time.monotonic() + within_s
    while True:
        events = [Event.loads(f[b"event"]) for _, f in await redis.xrange(stream)]
        done = [e for e in events if e.terminal]
        if len(done) >= count or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.05)


def test_deployed_redis_has_a_memory_cap_and_never_evicts() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    [k8s] = [d for d in yaml.safe_load_all((root / "deploy/k8s/redis.yaml").read_text())
             if d and d["kind"] == "StatefulSet"]
    k8s_args = k8s["spec"]["template"]["spec"]["containers"][0]["args"]
    for args in (compose, k8s_args):
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        assert args[args.index("--maxmemory") + 1] in ("${DEPLOY_REDIS_MAXMEMORY:-1gb}", "1gb")
