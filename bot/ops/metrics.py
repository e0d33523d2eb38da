"""Prometheus metrics (served with health on CODELOOP_METRICS_PORT: bot/ops/metrics_server.py) and the
logging set-up every command shares (``bot.cli`` applies it before a command runs)."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from bot.core.settings import Settings

JOBS = Counter("codeloop_jobs_total", "Jobs finished, by outcome", ["outcome"])
JOB_SECONDS = Histogram(
    "codeloop_job_seconds", "Enqueue to final event", buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
)
PICKUP_SECONDS = Histogram(
    "codeloop_pickup_seconds", "Enqueue to pickup by a worker", buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10)
)
ROUNDS = Histogram("codeloop_rounds_per_job", "Model replies per job", buckets=(1, 2, 3, 4, 5, 8, 12))
GEN_TOKENS_PER_S = Histogram(
    "codeloop_generation_tokens_per_second", "Streamed chunks per second per reply (≈ tokens/s)",
    buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640),
)
CELL_SECONDS = Histogram(
    "codeloop_sandbox_cell_seconds", "Sandbox cell run time", buckets=(0.005, 0.05, 0.2, 1, 5, 15, 30, 60)
)
ERRORS = Counter("codeloop_errors_total", "Errors by kind", ["kind"])
DEAD_LETTERS = Counter("codeloop_dead_letters_total", "Entries moved to the dead-letter stream", ["reason"])
QUEUE_DEPTH = Gauge("codeloop_queue_depth", "Jobs waiting (lag) and delivered-unacked (pending)", ["state"])
ACTIVE_JOBS = Gauge("codeloop_active_jobs", "Jobs this worker holds (running or waiting their turn)")
# Usage (bot/queue/usage.py keeps the same figures per user in Redis): labelled by adapter and
# channel only, never by user, so the series stay bounded (CODELOOP_METRICS_CHANNEL_LABEL=false
# folds every channel into "all").
_USAGE = ["adapter", "channel"]
USAGE_JOBS = Counter("codeloop_usage_jobs_total", "Jobs counted for usage", _USAGE)
USAGE_ROUNDS = Counter("codeloop_usage_feedback_rounds_total", "Model replies that answered execution feedback",
                       _USAGE)
USAGE_CPU = Counter("codeloop_usage_sandbox_cpu_seconds_total", "Sandbox CPU seconds used by cells", _USAGE)
USAGE_TOKENS = Counter("codeloop_usage_tokens_total", "Model tokens: prompt (in) and generated (out)",
                       [*_USAGE, "direction"])
USAGE_FAILURES = Counter("codeloop_usage_failures_total", "Jobs that ended in an error or a still-failing cell",
                         _USAGE)

#: set per job so every log line carries its ids
log_context: ContextVar[dict[str, str]] = ContextVar("codeloop_log_context", default={})  # noqa: B039


def count_usage(settings: Settings, adapter: str, channel: str, *, rounds: int, cpu_s: float, tokens_in: int,
                tokens_out: int, failed: bool) -> None:
    """One job's usage on the Prometheus counters."""
    labels = (adapter, channel if settings.metrics_channel_label else "all")
    USAGE_JOBS.labels(*labels).inc()
    USAGE_ROUNDS.labels(*labels).inc(rounds)
    USAGE_CPU.labels(*labels).inc(cpu_s)
    USAGE_TOKENS.labels(*labels, "in").inc(tokens_in)
    USAGE_TOKENS.labels(*labels, "out").inc(tokens_out)
    if failed:
        USAGE_FAILURES.labels(*labels).inc()
    else:
        USAGE_FAILURES.labels(*labels).inc(0)  # the series exists from a channel's first job


def start_metrics_server(settings: Settings) -> None:
    """Serve /metrics, /healthz and /livez when CODELOOP_METRICS_PORT is set (bot/ops/metrics_server.py)."""
    from bot.ops import metrics_server

    metrics_server.start(settings)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **log_context.get(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = log_context.get()
        record.ctx = (" " + " ".join(f"{k}={v}" for k, v in ctx.items())) if ctx else ""
        return True


def setup_logging(settings: Settings) -> None:
    """Log level and format (plain, or one JSON object a line) from the settings, for every command.
    Replaces the handler a previous call installed, so calling it again (tests, ``console``
    starting a worker) never doubles the lines."""
    handler = _StderrHandler()
    handler.addFilter(_ContextFilter())
    if settings.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(ctx)s"))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StderrHandler)] + [handler]
    root.setLevel(settings.log_level)
    for noisy in ("httpx", "httpcore", "urllib3", "docker", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (pytest swaps it per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass
