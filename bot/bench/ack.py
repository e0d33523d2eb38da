"""``codeloop bench ack``: how fast the Slack adapter acks under a burst of signed events.

The adapter runs as it does in production (``codeloop slack`` in HTTP mode, in its own process,
real Redis); this process plays Slack: it signs N distinct ``app_mention`` events and sends them
all at once over loopback, timing each request until its 200, and serves a minimal Web API for
the adapter's own calls (auth.test, status messages). Optionally every event is also delivered
again with ``X-Slack-Retry-Num`` to show retries make no extra jobs. The same bursts go to a bare
aiohttp handler in a process of its own (the floor: what this machine and client cost before any
Slack, Bolt or Redis work), alternating with the adapter's round by round so both see the same
load. Prints one JSON object per line: the latency figures, the ratio of the adapter's p99 to the
floor's (the target: within ``TARGET_RATIO``), then the number of jobs on the stream (must equal
the events).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing
import os
import secrets
import socket
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from bot.core.settings import Settings

#: the adapter's p99 ack within this multiple of the bare aiohttp floor's, measured in the same run
TARGET_RATIO = 1.5


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=100, help="concurrent distinct events (default 100)")
    parser.add_argument("--retries", type=int, default=0, help="extra deliveries of each event, as Slack retries")
    parser.add_argument("--rounds", type=int, default=3, help="bursts to send; figures are over all of them")
    parser.add_argument("--gap-s", type=float, default=1.0,
                        help="pause between bursts, so one burst's status messages don't overlap the next")
    parser.add_argument("--redis-url", help="Redis to use (default CODELOOP_REDIS_URL)")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_bench(args))


async def _bench(args: argparse.Namespace) -> int:
    # The Web API the adapter posts its status messages to runs in a process of its own: served from
    # this one, it would take CPU from the client whose timings are the figures.
    api_port = _free_port()
    api_proc = multiprocessing.get_context("spawn").Process(target=_serve_web_api, args=(api_port,), daemon=True)
    api_proc.start()
    api = f"http://127.0.0.1:{api_port}/api/"
    port = _free_port()
    secret = secrets.token_hex(16)
    prefix = f"bench-ack-{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {
        "key_prefix": prefix, "slack_mode": "http", "slack_bot_token": "xoxb-bench", "slack_signing_secret": secret,
        "slack_api_url": api, "slack_http_host": "127.0.0.1", "slack_http_port": port, "log_level": "WARNING",
    }
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    settings = Settings.load(**overrides)
    child = multiprocessing.get_context("spawn").Process(target=_serve, args=(overrides,), daemon=True)
    child.start()
    redis = aioredis.from_url(settings.redis_url)
    url = f"http://127.0.0.1:{port}/slack/events"
    floor_port = _free_port()
    floor_proc = multiprocessing.get_context("spawn").Process(target=_serve_floor, args=(floor_port,), daemon=True)
    floor_proc.start()
    floor_url = f"http://127.0.0.1:{floor_port}/slack/events"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await _wait_ready(http, f"http://127.0.0.1:{api_port}/healthz", api_proc)
            await _wait_ready(http, f"http://127.0.0.1:{port}/healthz", child)
            await _wait_ready(http, f"http://127.0.0.1:{floor_port}/healthz", floor_proc)
            adapter = _Target(url, child.pid, args.retries, report=True)
            floor = _Target(floor_url, floor_proc.pid, 0, report=False)
            await _alternate(http, secret, args, adapter, floor)
        await asyncio.sleep(0.2)
        jobs = await redis.xlen(settings.key("jobs")) - args.events  # minus the warm-up burst
        expected = args.events * args.rounds
        lat, low = sorted(adapter.latencies), sorted(floor.latencies)
        p99, floor_p99 = _p99(lat), _p99(low)
        print(json.dumps({"bench": "ack", "figure": "ack_ms", "deliveries": len(lat), "concurrency": args.events,
                          "p50": round(statistics.median(lat), 2), "p99": round(p99, 2), "max": round(lat[-1], 2),
                          "cpu_ms_per_delivery": _per(adapter.cpu_ms, lat)}))
        print(json.dumps({"bench": "ack", "figure": "floor_ms", "deliveries": len(low), "concurrency": args.events,
                          "p50": round(statistics.median(low), 2), "p99": round(floor_p99, 2),
                          "cpu_ms_per_delivery": _per(floor.cpu_ms, low),
                          "what": "the same client and bursts against a bare aiohttp handler in its own process, "
                                  "alternating with the adapter's"}))
        ratio = p99 / floor_p99 if floor_p99 > 0 else float("inf")
        print(json.dumps({"bench": "ack", "figure": "ratio", "p99_ratio": round(ratio, 2),
                          "p50_ratio": round(statistics.median(lat) / max(statistics.median(low), 1e-9), 2),
                          "target": TARGET_RATIO, "within_target": ratio <= TARGET_RATIO}))
        print(json.dumps({"bench": "ack", "figure": "jobs", "events": expected,
                          "deliveries": expected * (args.retries + 1), "jobs": jobs, "ok": jobs == expected}))
        return 0 if jobs == expected else 1
    finally:
        for proc in (child, floor_proc):
            proc.terminate()
            proc.join(10)
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        api_proc.terminate()
        api_proc.join(10)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def _per(cpu_ms: float | None, deliveries: list[float]) -> float | None:
    return round(cpu_ms / len(deliveries), 3) if cpu_ms is not None and deliveries else None


def _cpu_ms(pid: int | None) -> float | None:
    """CPU time (user + system) a process has used so far, in ms; None where /proc is not there.
    Unlike the latencies, barely moved by other load on the machine."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


@dataclass
class _Target:
    """Where bursts go, and what they measured there: latencies in ms, and the CPU ms process
    ``pid`` spent on them (its work after the acks included)."""

    url: str
    pid: int | None
    retries: int
    report: bool
    latencies: list[float] = field(default_factory=list)
    cpu_ms: float | None = 0.0


async def _alternate(http: aiohttp.ClientSession, secret: str, args: argparse.Namespace, *targets: _Target) -> None:
    """One warm-up burst per target, not counted (auth.test and opening the client's
    ``args.events`` connections are start-up cost: counted, the first burst's TCP handshakes set
    p99), then ``args.rounds`` bursts of ``args.events`` to each target in turn (the order turned
    round each round), each delivered ``retries`` more times."""
    for target in targets:
        await _deliver(http, target.url, secret, [_event(0, i) for i in range(args.events)], retry=0)
    await asyncio.sleep(args.gap_s)
    for r in range(1, args.rounds + 1):
        bodies = [_event(r, i) for i in range(args.events)]
        for target in targets if r % 2 else targets[::-1]:
            cpu_before = _cpu_ms(target.pid)
            for retry in range(target.retries + 1):
                burst = await _deliver(http, target.url, secret, bodies, retry)
                if target.report:
                    print(json.dumps({"bench": "ack", "figure": "burst", "round": r, "retry": retry,
                                      "p50": round(statistics.median(burst), 2), "max": round(max(burst), 2)}))
                target.latencies += burst
                await asyncio.sleep(args.gap_s)  # the burst's work after its acks, before the next
            cpu_after = _cpu_ms(target.pid)
            if cpu_before is None or cpu_after is None or target.cpu_ms is None:
                target.cpu_ms = None
            else:
                target.cpu_ms += cpu_after - cpu_before


def _serve_http(port: int, routes: list[web.RouteDef]) -> None:
    """A bench-side HTTP server in its own process, with /healthz for ``_wait_ready``."""
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([*routes, web.get("/healthz", healthz)])
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _serve_floor(port: int) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="")

    _serve_http(port, [web.post("/slack/events", ok)])


def _serve(overrides: dict[str, Any]) -> None:
    """The adapter process: exactly what ``codeloop slack --mode http`` runs."""
    from bot.adapters.slack.cli import serve

    asyncio.run(serve(Settings.load(**overrides)))


def _event(round_: int, i: int) -> str:
    ts = f"{int(time.time())}.{round_:02d}{i:04d}"
    return json.dumps({
        "token": "legacy", "team_id": "TBENCH", "api_app_id": "ABENCH", "type": "event_callback",
        "event_id": f"EvBench{round_}x{i}", "event_time": int(time.time()),
        # one user per event: 100 people at once (one user's burst would meet the rate limits)
        "event": {"type": "app_mention", "user": f"UBENCH{round_}x{i}", "text": f"<@UBOT> print({i})",
                  "channel": f"C{i:05d}",
                  "ts": ts, "event_ts": ts},
    })


async def _deliver(http: aiohttp.ClientSession, url: str, secret: str, bodies: list[str], retry: int) -> list[float]:
    """Send all bodies at once; milliseconds from send to 200 for each."""
    ts = str(int(time.time()))

    def headers(body: str) -> dict[str, str]:
        sig = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
        h = {"Content-Type": "application/json", "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={sig}"}
        if retry:
            h.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"})
        return h

    prepared = [(b, headers(b)) for b in bodies]
    gate = asyncio.Event()

    async def one(body: str, hdrs: dict[str, str]) -> float:
        await gate.wait()
        start = time.perf_counter()
        async with http.post(url, data=body, headers=hdrs) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"adapter answered {resp.status}")
        return (time.perf_counter() - start) * 1000

    tasks = [asyncio.create_task(one(b, h)) for b, h in prepared]
    await asyncio.sleep(0)
    gate.set()
    return list(await asyncio.gather(*tasks))


def _serve_web_api(port: int) -> None:
    """Just enough Slack Web API for the adapter: every method succeeds."""
    async def handle(request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if method == "auth.test":
            return web.json_response({"ok": True, "user_id": "UBOT", "bot_id": "BBOT", "team_id": "TBENCH"})
        return web.json_response({"ok": True, "ts": f"{time.time():.6f}", "channel": "C"})

    _serve_http(port, [web.post("/api/{method}", handle)])


async def _wait_ready(http: aiohttp.ClientSession, url: str, child: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not child.is_alive():
            raise RuntimeError("the adapter process exited during start-up")
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the adapter did not start within 30 s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
