"""The operations endpoint of every long-running command: Prometheus metrics and health.

``codeloop worker``, ``slack`` and ``discord`` serve it on ``CODELOOP_METRICS_PORT`` (compose and
Kubernetes: 9100, not published) from a thread of its own, so a scrape is answered even while the
event loop is busy:

* ``/metrics``: the Prometheus text format;
* ``/healthz``: readiness. 200 when every check passes, else 503. The checks run *on the
  command's event loop*, so a stuck loop fails them too; the JSON body names each check's state;
* ``/livez``: liveness. Only the checks a restart can cure (the event loop turns, the chat
  platform's connection is up): a Redis outage makes every pod unready, but restarting them all
  would not bring Redis back.

A command registers its checks once its loop runs (``PROBE.watch``); before that, and after the
loop has ended, both health endpoints answer 503 with ``"status": "starting"`` or ``"stopped"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from bot.core.settings import Settings
from bot.queue import redis_conn

log = logging.getLogger(__name__)

#: a check returns one line about what it saw, or raises with the reason it failed
Check = Callable[[], Awaitable[str]]
CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Registered:
    check: Check
    live: bool


class Probe:
    """The health checks of this process, run on the event loop that registered them."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checks: dict[str, _Registered] = {}
        self._state = "starting"

    def watch(self, checks: dict[str, Check], *, live: tuple[str, ...] = ()) -> None:
        """Register ``checks`` (name -> check) on the running loop; ``live`` names those that count
        for liveness as well as readiness. Call it again to add more."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop:
                self._checks = {}
            self._loop = loop
            self._state = "running"
            self._checks.update({name: _Registered(check, name in live) for name, check in checks.items()})

    def stop(self) -> None:
        """The command's loop is ending: health answers 503 "stopped" from now on."""
        with self._lock:
            self._loop, self._checks, self._state = None, {}, "stopped"

    def report(self, *, live_only: bool = False) -> tuple[bool, dict[str, Any]]:
        """(healthy, body) for /healthz (``live_only=False``) or /livez; called from any thread."""
        with self._lock:
            loop, state = self._loop, self._state
            checks = {n: r.check for n, r in self._checks.items() if r.live or not live_only}
        if loop is None or loop.is_closed():
            return False, {"status": state, "checks": {}}
        try:
            future = asyncio.run_coroutine_threadsafe(self._run(checks), loop)
        except RuntimeError:  # the loop closed between the two lines
            return False, {"status": "stopped", "checks": {}}
        try:
            results = future.result(self.timeout_s + 1.0)
        except (TimeoutError, asyncio.CancelledError):
            future.cancel()
            results = {"event_loop": {"ok": False,
                                      "detail": f"the event loop did not run the checks within {self.timeout_s:g} s"}}
        healthy = all(r["ok"] for r in results.values())
        return healthy, {"status": "ok" if healthy else "fail", "checks": results}

    async def _run(self, checks: dict[str, Check]) -> dict[str, dict[str, Any]]:
        names = list(checks)
        outcomes = await asyncio.gather(*(asyncio.wait_for(checks[n](), self.timeout_s) for n in names),
                                        return_exceptions=True)
        results: dict[str, dict[str, Any]] = {"event_loop": {"ok": True, "detail": "turning"}}
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, TimeoutError):
                    reason = f"no answer within {self.timeout_s:g} s"
                else:
                    reason = str(outcome) or type(outcome).__name__
                results[name] = {"ok": False, "detail": reason[:300]}
            else:
                results[name] = {"ok": True, "detail": str(outcome)[:300]}
        return results


#: the process's probe: commands register their checks here, the HTTP server reads it
PROBE = Probe()


def redis_check(settings: Settings) -> tuple[Check, Callable[[], Awaitable[None]]]:
    """A PING on a connection of its own, without retries: a busy command pool must not make the
    probe wait, and an outage must show now, not after the pool's retry budget. Returns the check
    and the coroutine function that closes its connection."""
    client = redis_conn.probe(settings, 3.0)  # through the sentinels when they are set

    async def check() -> str:
        await client.ping()
        return "PING answered"

    async def close() -> None:
        await client.aclose()

    return check, close


class _Handler(BaseHTTPRequestHandler):
    probe: Probe = PROBE

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/livez"):
            healthy, body = self.probe.report(live_only=path == "/livez")
            self._send(200 if healthy else 503, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /livez\n", "text/plain")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass  # probes every few seconds would drown the log


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/livez`` on ``host:port``, served from a daemon thread."""

    def __init__(self, port: int, host: str = "0.0.0.0", probe: Probe = PROBE) -> None:
        handler = type("Handler", (_Handler,), {"probe": probe})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="codeloop-ops", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start(settings: Settings) -> OpsServer | None:
    """Serve the ops endpoint when ``CODELOOP_METRICS_PORT`` is set."""
    if not settings.metrics_port:
        return None
    server = OpsServer(settings.metrics_port)
    log.info("metrics and health on :%d (/metrics, /healthz, /livez)", server.port)
    return server
