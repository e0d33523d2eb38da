"""The benchmarks keep working: each runs small and prints its figures (no figure is judged here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REDIS_URL


def run_bench(*args: str) -> list[dict[str, object]]:
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "bench", *args], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "CODELOOP_REDIS_URL": REDIS_URL})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("consumer", ["same", "own"])
def test_bench_queue_prints_whole_path_beside_raw(consumer: str) -> None:
    figures = {f["name"]: f for f in run_bench("queue", "--producers", "2", "--jobs", "200", "--repeat", "1",
                                               "--consumer", consumer, "--redis-url", REDIS_URL)}
    assert set(figures) == {"raw_stream_jobs_per_s", "queue_jobs_per_s", "raw_enqueue_to_pickup_p50",
                            "queue_enqueue_to_pickup_p50", "queue_enqueue_to_pickup_p99"}
    queue = figures["queue_jobs_per_s"]
    assert queue["producers"] == 2 and float(queue["value"]) > 0 and float(queue["ratio"]) > 0  # type: ignore[arg-type]


def test_bench_ack_acks_every_event_once() -> None:
    figures = {f["figure"]: f for f in run_bench("ack", "--events", "5", "--rounds", "1", "--retries", "1",
                                                 "--gap-s", "0.1")}
    assert figures["jobs"]["ok"] is True and figures["jobs"]["jobs"] == 5  # the retries made no extra jobs
    assert figures["ack_ms"]["deliveries"] == 10 and figures["floor_ms"]["deliveries"] == 5


def test_bench_replies_reads_every_event_each_way() -> None:
    figures = run_bench("replies", "--jobs", "10", "--events", "5", "--redis-url", REDIS_URL)
    names = [(f["name"], f.get("replicas")) for f in figures]
    assert names == [("plain_events_per_s", 1), ("plain_round_trips_per_event", 1),
                     ("leased_events_per_s", 1), ("leased_round_trips_per_event", 1),
                     ("leased_events_per_s", 2), ("leased_round_trips_per_event", 2)]
    assert all(float(f["value"]) > 0 for f in figures)  # type: ignore[arg-type]
