"""Files persist across session loss (issue 16 item 5): the worker's per-thread copy of /mnt data.

Through a real worker, real Redis and real sandboxes: a file written by a cell comes back after the
thread's container is removed from the engine (as the reaper would), reset removes it, the cap
evicts the oldest, and no thread sees another's files. The store's own file handling (no-follow,
inside the thread's folder only, expiry) is tested on its own below.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import docker
import pytest
import redis.asyncio as aioredis

from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.stream import JobQueue
from bot.worker.files_store import FilesStore, ThreadFiles, parse_size
from bot.worker.sandbox_link import RESTORED

WRITE = "```python\nopen('/mnt/data/keep.txt', 'w').write('kept 42')\nx = 1\nprint('written')\n```"
READ = ("```python\nimport os\nprint('files:', sorted(os.listdir('/mnt/data')))\n"
        "print(open('/mnt/data/keep.txt').read() if os.path.exists('/mnt/data/keep.txt') else 'no keep.txt')\n"
        "print('x' in globals())\n```")
#: removes the other big file first (the sandbox's /mnt/data has the same cap); the store never hears
#: of a removal, so it evicts
BIG = ("```python\nimport glob, os\n[os.remove(p) for p in glob.glob('/mnt/data/*.bin')]\n"
       "open('/mnt/data/{name}', 'wb').write(b'z' * 600_000)\nprint('big')\n```")

TWO = "```python\nfor n in ('a.txt', 'b.txt'):\n    open('/mnt/data/' + n, 'w').write(n)\n```"


def script(messages: list[dict[str, Any]]) -> str:
    last = str(messages[-1]["content"])
    if last.startswith("Execution result"):
        return "Done."
    if last.startswith("write"):
        return WRITE
    if last.startswith("big "):
        return BIG.format(name=last.split()[1])
    if last.startswith("two"):
        return TWO
    return READ


def conv(thread: str) -> Conversation:
    return Conversation(platform="test", channel="c", thread=thread)


async def ask(queue: JobQueue, redis: aioredis.Redis, thread: str, text: str, reply: str,
              kind: str = "message") -> Event:
    job = Job(idempotency_key=f"{thread}-{text}-{time.monotonic()}", user="u", text=text, reply_stream=reply,
              conversation=conv(thread), kind=kind)  # type: ignore[arg-type]
    await queue.enqueue(job)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for _, fields in await redis.xrange(reply):
            event = Event.loads(fields[b"event"])
            if event.job_id == job.id and event.terminal:
                return event
        await asyncio.sleep(0.05)
    raise AssertionError(f"no final for {text!r}")


def feedback(model_server: Any) -> str:
    """The last execution result the model was sent."""
    for request in reversed(model_server.requests):
        last = str(request["messages"][-1]["content"])
        if last.startswith("Execution result"):
            return last
    raise AssertionError("the model was never sent a result")


async def remove_session(redis: aioredis.Redis, settings: Settings, thread: str) -> None:
    """Remove the thread's container from the engine, as the reaper does."""
    state = json.loads(await redis.get(settings.key("conv", conv(thread).key, "state")) or "{}")
    assert state.get("session_id")
    await asyncio.to_thread(lambda: docker.from_env().containers.get(state["session_id"]).remove(force=True))


def store_of(settings: Settings, thread: str) -> ThreadFiles:
    return FilesStore.from_settings(settings).thread(conv(thread).key)


async def test_files_come_back_after_the_session_is_removed_and_reset_removes_them(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, settings: Settings) -> None:
    model_server.script = script
    worker = await start_worker()
    queue, reply = JobQueue(redis_client, worker.settings), "replies:persist"
    assert (await ask(queue, redis_client, "T", "write it", reply)).type == "final"
    assert store_of(worker.settings, "T").read("keep.txt") == b"kept 42"

    await remove_session(redis_client, worker.settings, "T")
    assert (await ask(queue, redis_client, "T", "read it", reply)).type == "final"
    seen = feedback(model_server)
    assert "kept 42" in seen and "False" in seen  # the file is back, the variable is not
    assert f"{RESTORED} (keep.txt)." in seen
    assert "expired" in seen or "stopped unexpectedly" in seen

    assert (await ask(queue, redis_client, "T", "reset", reply, kind="reset")).type == "final"
    assert not store_of(worker.settings, "T").folder.exists()
    assert (await ask(queue, redis_client, "T", "read again", reply)).type == "final"
    assert "no keep.txt" in feedback(model_server)


async def test_the_cap_evicts_the_oldest_and_the_note_says_so(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = script
    worker = await start_worker(sandbox_data_size="1m")
    queue, reply = JobQueue(redis_client, worker.settings), "replies:cap"
    await ask(queue, redis_client, "C", "big a.bin", reply)
    await ask(queue, redis_client, "C", "big b.bin", reply)
    assert "the oldest were dropped from that copy" in feedback(model_server)
    assert store_of(worker.settings, "C").names() == ["b.bin"]

    await remove_session(redis_client, worker.settings, "C")
    await ask(queue, redis_client, "C", "read", reply)
    seen = feedback(model_server)
    assert "files: ['b.bin']" in seen
    assert f"{RESTORED} (b.bin)." in seen
    assert "Not restored (in a subfolder, or over this thread's file cap): a.bin." in seen


async def test_files_never_returned_are_named_as_not_restorable(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = script
    worker = await start_worker(sandbox_max_files=1)  # a cell returns one file; the other stays inside
    queue, reply = JobQueue(redis_client, worker.settings), "replies:unreturned"
    await ask(queue, redis_client, "U", "two files", reply)
    assert "were not returned" in feedback(model_server)
    assert store_of(worker.settings, "U").names() == ["a.txt"]
    await remove_session(redis_client, worker.settings, "U")
    await ask(queue, redis_client, "U", "read", reply)
    seen = feedback(model_server)
    assert "files: ['a.txt']" in seen and f"{RESTORED} (a.txt)." in seen
    assert "Files a cell wrote that were not returned (over the per-cell return caps) could not be restored." in seen


async def test_no_thread_sees_another_threads_files(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = script
    worker = await start_worker()
    queue, reply = JobQueue(redis_client, worker.settings), "replies:iso"
    await ask(queue, redis_client, "A", "write it", reply)
    await ask(queue, redis_client, "B", "read it", reply)
    assert "files: []" in feedback(model_server)
    await remove_session(redis_client, worker.settings, "B")
    await ask(queue, redis_client, "B", "read it", reply)  # B's fresh session: still none of A's
    seen = feedback(model_server)
    assert "files: []" in seen and "kept 42" not in seen and "restored" not in seen
    a, b = store_of(worker.settings, "A"), store_of(worker.settings, "B")
    assert a.folder != b.folder and a.names() == ["keep.txt"] and b.names() == []


# --- the store on its own -----------------------------------------------------------------------
def test_names_stay_inside_the_threads_folder_and_links_are_never_followed(tmp_path: Path) -> None:
    store = FilesStore(tmp_path / "files", 10_000, 3600)
    files = store.thread("slack/T/C/1")
    files.save("out/plot.png", b"png")
    outside = tmp_path / "outside"
    outside.mkdir()
    data = files.folder / "data"
    os.symlink(outside, data / "sub")  # a link planted where a folder goes
    os.symlink(outside / "f", data / "f.txt")  # and where a file goes
    files.save("sub/x.txt", b"x")
    files.save("f.txt", b"f")
    assert list(outside.iterdir()) == []
    assert (data / "sub").is_dir() and not (data / "sub").is_symlink()
    assert files.read("sub/x.txt") == b"x" and files.read("f.txt") == b"f"
    for bad in ("../escape", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            files.save(bad, b"no")
    files.save("out", b"a file where a folder was")
    assert files.read("out") == b"a file where a folder was"
    assert files.restore_plan() == (["f.txt", "out"], ["sub/x.txt"], False)


def test_a_file_over_the_cap_is_refused_with_a_note(tmp_path: Path) -> None:
    files = FilesStore(tmp_path, 100, 3600).thread("t")
    assert files.save("small", b"s" * 60) == []
    [note] = files.save("huge", b"h" * 101)
    assert "larger than this thread's file store" in note
    assert files.names() == ["small"] and files.restore_plan()[1] == ["huge"]


def test_threads_expire_with_the_conversation_ttl_and_clean_removes_all(tmp_path: Path) -> None:
    store = FilesStore(tmp_path, 100, 60)
    old, new = store.thread("old"), store.thread("new")
    old.save("a", b"1")
    new.save("b", b"2")
    os.utime(old.folder, (time.time() - 120, time.time() - 120))
    assert store.sweep() == 1
    assert not old.folder.exists() and new.folder.exists()
    assert store.clear() == 1 and not new.folder.exists()


def test_parse_size() -> None:
    assert parse_size("256m") == 256 * 2**20 and parse_size("1g") == 2**30 and parse_size("4096") == 4096
