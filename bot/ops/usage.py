"""``codeloop usage``: who used how much, per channel and per user (bot/queue/usage.py counts it).

    codeloop usage --since 7d                      the last 7 UTC days, today included
    codeloop usage --since 2026-11-01 --until 2026-11-15 --json
    codeloop usage --since 30d --channel C0123     that channel, and each user's share of it
    codeloop usage --since 30d --user slack:U0456  that user, and the channels they used

Counters are kept per UTC day, so ``--since 12h`` covers the days those hours touch. A channel or
user is named by its id, or ``adapter:id`` when ids of two platforms could clash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from datetime import UTC, date, datetime, timedelta

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.queue import redis_conn
from bot.queue.usage import Report, Row, read

_AGO = re.compile(r"^(\d{1,5})([dh])$")
COLUMNS = ("jobs", "rounds", "cpu_s", "tokens_in", "tokens_out", "failures")


def parse_day(text: str, now: datetime | None = None) -> date:
    """``7d`` / ``12h`` (that long before now, UTC), ``today``, or a date ``YYYY-MM-DD``."""
    now = now or datetime.now(UTC)
    text = text.strip().lower()
    if text in ("today", "now"):
        return now.date()
    if match := _AGO.match(text):
        n, unit = int(match[1]), match[2]
        # "7d" is 7 days back and today: the last 7 days; "12h" the days those hours touch
        delta = timedelta(days=n - 1) if unit == "d" and n > 0 else timedelta(hours=n if unit == "h" else 0)
        return (now - delta).date()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not Nd, Nh or a date (YYYY-MM-DD)") from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="7d", help="Nd, Nh or YYYY-MM-DD (default 7d: the last 7 days)")
    parser.add_argument("--until", default="today", help="Nd, Nh or YYYY-MM-DD, included (default today)")
    parser.add_argument("--channel", help="one channel: its id or adapter:id")
    parser.add_argument("--user", help="one user: their id or adapter:id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _table(title: str, what: str, rows: list[Row]) -> list[str]:
    header = ("adapter", what, *COLUMNS)
    cells = [(r.adapter, r.name, *(str(r.counts.as_dict()[k]) for k in COLUMNS)) for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths,
                                                                                         strict=True))).rstrip()

    return [f"{title} ({len(rows)})", line(header), *(line(c) for c in cells)] if rows else [f"{title}: none"]


def render(report: Report) -> str:
    lines = [f"usage {report.since.isoformat()} .. {report.until.isoformat()} (UTC days)", ""]
    lines += [*_table("channels", "channel", report.channels), ""]
    lines += [*_table("users", "user", report.users), ""]
    total = report.total.as_dict()
    lines.append("total  " + "  ".join(f"{k}={total[k]}" for k in COLUMNS))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    since, until = parse_day(args.since), parse_day(args.until)
    if since > until:
        raise ConfigError(f"--since {since} is after --until {until}")
    if (until - since).days > 3660:
        raise ConfigError("ask for ten years at most")
    settings = Settings.load()

    async def fetch() -> Report:
        redis = redis_conn.connect(settings, max_connections=4)
        try:
            await redis_conn.check(redis, settings)
            return await read(redis, settings, since, until, channel=args.channel, user=args.user)
        finally:
            await redis.aclose()

    report = asyncio.run(fetch())
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0
