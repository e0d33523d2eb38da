"""Usage for admins through the real worker, real Redis and real sandboxes: what a job used is
counted once per channel and user (bot/queue/usage.py), read back by ``codeloop usage`` in a
subprocess, and shown on the metrics endpoint by channel, never by user."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from bot.core.jobs import Conversation, Job
from bot.core.settings import Settings
from bot.ops import metrics
from bot.ops.metrics_server import OpsServer
from bot.ops.usage import parse_day, render
from bot.queue.stream import JobQueue
from bot.queue.usage import Counts, UsageRecorder, read
from tests.conftest import REDIS_URL
from tests.processes import worker_process
from tests.worker.test_service import finals

#: ~0.3 s of CPU in the kernel (CPU time, whatever the wall clock does on a busy machine)
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
FAILING = f"```python\n{BURN}1 / 0\n```"
FIXED = f"```python\n{BURN}print('fixed')\n```"


def job(channel: str, user: str, thread: str, text: str, reply: str) -> Job:
    return Job(idempotency_key=f"{channel}-{thread}-{text}", user=user, text=text, reply_stream=reply,
               conversation=Conversation(platform="test", channel=channel, thread=thread))


def fail_then_fix(messages: list[dict[str, Any]]) -> str:
    last = messages[-1]["content"]
    if "ZeroDivisionError" in last:
        return FIXED
    return "Done." if last.startswith("Execution result") else FAILING


def today() -> Any:
    return datetime.now(UTC).date()


def usage_cli(settings: Settings, *args: str) -> dict[str, Any]:
    env = {**os.environ, "CODELOOP_REDIS_URL": REDIS_URL, "CODELOOP_KEY_PREFIX": settings.key_prefix}
    out = subprocess.run([sys.executable, "-m", "bot.cli", "usage", "--since", "2d", "--json", *args],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("codeloop_usage")
            for s in family.samples}


async def counted(redis: aioredis.Redis, settings: Any, jobs: int = 1) -> Any:
    """Today's usage once the worker has recorded ``jobs`` jobs (it counts right after a final is sent)."""
    for _ in range(200):
        report = await read(redis, settings, today(), today())
        if report.total.jobs >= jobs:
            return report
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {jobs} jobs counted within 10 s of their finals")


async def test_a_job_is_counted_per_channel_and_user_with_what_it_used(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, key_prefix: str) -> None:
    model_server.script = fail_then_fix
    worker = await start_worker(max_rounds=1)
    queue = JobQueue(redis_client, worker.settings)
    channel = f"chan-{key_prefix}"
    reply = worker.settings.key("replies", "t")
    ops = OpsServer(0, host="127.0.0.1")
    try:
        sent = job(channel, "alice", "T1", "divide", reply)
        await queue.enqueue(sent)
        [(_, final)] = await finals(redis_client, reply, 1)
        assert final.type == "final" and final.payload["rounds"] == 2, final.payload
        # one feedback round (the fix), two cells of ~0.3 s CPU each, the last one fixed
        report = await counted(redis_client, worker.settings)  # the count follows the final reply
        [row] = report.channels
        [user] = report.users
        assert (row.adapter, row.name, user.name) == ("test", channel, "alice")
        served = model_server.usage
        assert len(served) == 2
        expected = {"jobs": 1, "rounds": 1, "failures": 0,
                    "tokens_in": sum(u["prompt_tokens"] for u in served),
                    "tokens_out": sum(u["completion_tokens"] for u in served)}
        for counts in (row.counts, user.counts, report.total):
            assert {k: getattr(counts, k) for k in expected} == expected
            assert counts.tokens_in > 0 and counts.tokens_out > 0
            assert counts.cpu_s > 0.1, counts.cpu_s  # CPU time of the cells, not wall time
        print(f"\nsandbox CPU of two ~0.3 s cells: {row.counts.cpu_s:.3f} s")

        # the same job ending again (taken over by another worker) is not counted twice
        again = await UsageRecorder(redis_client, worker.settings).record(
            sent.id, "test", channel, "alice", Counts(jobs=1, rounds=5, cpu_us=10**6, tokens_in=9, failures=1))
        assert again is False
        assert (await read(redis_client, worker.settings, today(), today())).total == report.total

        # codeloop usage, in a process of its own
        shown = await asyncio.to_thread(usage_cli, worker.settings)
        assert shown["channels"] == [{"adapter": "test", "channel": channel, **row.counts.as_dict()}]
        assert shown["users"] == [{"adapter": "test", "user": "alice", **row.counts.as_dict()}]
        assert shown["total"] == row.counts.as_dict()

        # Prometheus: the same counters by adapter and channel; no user label anywhere
        samples = scrape(ops.port)
        labels = (("adapter", "test"), ("channel", channel))
        assert samples[("codeloop_usage_jobs_total", labels)] == 1
        assert samples[("codeloop_usage_feedback_rounds_total", labels)] == 1
        assert samples[("codeloop_usage_failures_total", labels)] == 0
        assert samples[("codeloop_usage_tokens_total", (*labels, ("direction", "in")))] == expected["tokens_in"]
        assert samples[("codeloop_usage_tokens_total", (*labels, ("direction", "out")))] == expected["tokens_out"]
        assert samples[("codeloop_usage_sandbox_cpu_seconds_total", labels)] == pytest.approx(row.counts.cpu_s,
                                                                                              abs=1e-3)
        assert all("user" not in dict(lbl) for _, lbl in samples), [lbl for _, lbl in samples]
    finally:
        ops.close()


async def test_failures_are_counted_and_filters_split_users_and_channels(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, key_prefix: str) -> None:
    """An error final (the model server refused) and a last cell that still fails both count as
    failures; --channel / --user show a user's share of a channel."""
    model_server.script = [FAILING]
    worker = await start_worker(max_rounds=0, llm_retries=0)
    queue = JobQueue(redis_client, worker.settings)
    one, two = f"one-{key_prefix}", f"two-{key_prefix}"
    reply = worker.settings.key("replies", "t")
    await queue.enqueue(job(one, "bob", "T1", "keeps failing", reply))  # its only cell fails
    await finals(redis_client, reply, 1)
    model_server.fail_times, model_server.fail_status = 1, 500
    await queue.enqueue(job(two, "bob", "T2", "model refuses", reply))
    model_server.script = ["No code needed."]
    await finals(redis_client, reply, 2)
    await queue.enqueue(job(one, "carol", "T3", "fine", reply))
    done = await finals(redis_client, reply, 3)
    assert [e.type for _, e in done] == ["final", "error", "final"]

    report = await counted(redis_client, worker.settings, jobs=3)
    by_channel = {r.name: r.counts for r in report.channels}
    assert (by_channel[one].jobs, by_channel[one].failures, by_channel[two].jobs, by_channel[two].failures) == (
        2, 1, 1, 1)
    assert by_channel[one].cpu_s > 0.1 and by_channel[two].tokens_out == 0  # refused before any token
    assert [(r.name, r.counts.jobs, r.counts.failures) for r in report.users] == [("bob", 2, 2), ("carol", 1, 0)]
    assert report.total.jobs == 3 and report.total.failures == 2

    shown = await asyncio.to_thread(usage_cli, worker.settings, "--channel", one)
    assert [(u["user"], u["jobs"], u["failures"]) for u in shown["users"]] == [("bob", 1, 1), ("carol", 1, 0)]
    assert [c["channel"] for c in shown["channels"]] == [one]
    shown = await asyncio.to_thread(usage_cli, worker.settings, "--user", "test:bob")
    assert sorted((c["channel"], c["jobs"]) for c in shown["channels"]) == [(one, 1), (two, 1)]
    assert shown["total"]["jobs"] == 2 and shown["total"]["failures"] == 2
    assert "carol" in render(report) and "failures" in render(report)


async def test_a_job_counted_by_two_racing_workers_is_counted_once(
        redis_client: aioredis.Redis, settings: Settings) -> None:
    recorder = UsageRecorder(redis_client, settings)
    results = await asyncio.gather(*(recorder.record("job-1", "slack", "C1", "U1", Counts(jobs=1, tokens_in=7))
                                     for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]
    report = await read(redis_client, settings, today(), today())
    assert (report.total.jobs, report.total.tokens_in) == (1, 7)
    ttl = await redis_client.ttl(settings.key("usage", today().isoformat(), "channel", "slack", "C1"))
    assert 0 < ttl <= settings.usage_retention_days * 86_400


async def test_days_outside_the_range_are_not_read(redis_client: aioredis.Redis, settings: Settings) -> None:
    recorder = UsageRecorder(redis_client, settings)
    now = datetime.now(UTC)
    await recorder.record("old", "slack", "C1", "U1", Counts(jobs=1), at=(now - timedelta(days=10)).timestamp())
    await recorder.record("new", "slack", "C1", "U1", Counts(jobs=1), at=now.timestamp())
    assert (await read(redis_client, settings, parse_day("7d"), today())).total.jobs == 1
    assert (await read(redis_client, settings, parse_day("11d"), today())).total.jobs == 2


def test_since_accepts_days_hours_and_dates() -> None:
    now = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
    assert parse_day("1d", now).isoformat() == "2026-11-30"
    assert parse_day("7d", now).isoformat() == "2026-11-24"
    assert parse_day("6h", now).isoformat() == "2026-11-29"  # the hours reach into yesterday
    assert parse_day("2026-11-01", now).isoformat() == "2026-11-01"


def test_the_channel_label_can_be_folded(make_settings: Any) -> None:
    settings = make_settings(metrics_channel_label=False)
    metrics.count_usage(settings, "folded-adapter", "C-secret", rounds=2, cpu_s=0.5, tokens_in=3, tokens_out=4,
                        failed=True)
    assert metrics.USAGE_JOBS.labels("folded-adapter", "all")._value.get() == 1
    assert metrics.USAGE_FAILURES.labels("folded-adapter", "all")._value.get() == 1


async def test_a_job_redelivered_after_its_worker_died_is_counted_once(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis, make_settings: Any,
        key_prefix: str) -> None:
    """kill -9 mid-generation: the job is reclaimed and run again by another worker, and counted
    once, with the run that reached the user."""
    model_server.script = ["answer after a crash"]
    model_server.stall_s = 3.0
    settings: Settings = make_settings(llm_url=model_server.url, claim_idle_s=1.0)
    victim = await worker_process(settings, key_prefix)
    queue = JobQueue(redis_client, settings)
    reply = settings.key("replies", "t")
    channel = f"crash-{key_prefix}"
    try:
        await queue.ensure_group()
        await queue.enqueue(job(channel, "dave", "K", "survive", reply))
        for _ in range(400):
            if model_server.requests:
                break
            await asyncio.sleep(0.05)
        assert model_server.requests, "the first worker never picked the job up"
    finally:
        victim.kill()
        await victim.wait()
    model_server.stall_s = 0.0
    await start_worker(claim_idle_s=1.0)
    [(_, final)] = await finals(redis_client, reply, 1, timeout=60)
    assert final.payload["text"] == "answer after a crash" and len(model_server.requests) == 2
    report = await counted(redis_client, settings)
    [row] = report.channels
    # one run's tokens, not two (the killed worker's stream, if the server finished it, went nowhere)
    runs = {(u["prompt_tokens"], u["completion_tokens"]) for u in model_server.usage}
    assert row.counts.jobs == 1 and (row.counts.tokens_in, row.counts.tokens_out) in runs, (row.counts, runs)
