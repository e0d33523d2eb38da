"""Usage accounting on Redis: what each job used, per channel and per user, by UTC day.

The worker records a job once it ends (finished, failed or stopped; ``bot.worker.jobrun``);
``codeloop usage`` (bot/ops/usage.py) reads the days asked for. Keys (under the settings' prefix):

    usage:<day>:channel:<adapter>:<channel>          counters of one channel on one UTC day
    usage:<day>:user:<adapter>:<user>                 ... of one user
    usage:<day>:pair:<adapter>:<channel>:<user>       ... of one user in one channel (for filters)
    usage:<day>:index                                 the day's hashes, as JSON [kind, adapter, ...]
    usage-done:<job id>                               the job was counted (idempotency marker)

Every hash has the fields of ``FIELDS`` and expires ``CODELOOP_USAGE_RETENTION_DAYS`` after its
last write. One script per job writes the marker (SET NX) and every counter, so a job that runs
again (its worker was thought dead and another took it over) is counted once: the first run to end
counts, the next finds the marker. The marker lives ``CODELOOP_IDEMPOTENCY_TTL_S``, the window in
which a job can be delivered again.

"failures" counts jobs whose final event is an error (the model failed or refused, the sandbox was
lost, the input was refused, an internal error) and jobs whose last executed cell still failed
(error, timeout or out of memory) when the turn ended: the user did not get working code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from bot.core.settings import Settings

#: one pipelined round trip: the marker, three hashes, the day's index, their TTLs
RECORD_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local ttl = ARGV[2]
for i = 3, #KEYS do
  for j = 6, #ARGV, 2 do redis.call('HINCRBY', KEYS[i], ARGV[j], ARGV[j + 1]) end
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('SADD', KEYS[2], ARGV[3], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""


@dataclass
class Counts:
    """What jobs used; ``cpu_us``: sandbox CPU in microseconds (integers add up exactly)."""

    jobs: int = 0
    rounds: int = 0
    cpu_us: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    failures: int = 0

    @property
    def cpu_s(self) -> float:
        return self.cpu_us / 1e6

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, Any]:
        """The counts as shown: CPU in seconds (ms precision) in place of microseconds."""
        return {("cpu_s" if k == "cpu_us" else k): (round(self.cpu_s, 3) if k == "cpu_us" else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Counts:
        known = {f.name for f in fields(cls)}
        return cls(**{k.decode(): int(v) for k, v in raw.items() if k.decode() in known})


FIELDS = tuple(f.name for f in fields(Counts))


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


class UsageRecorder:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(RECORD_LUA)

    async def record(self, job_id: str, adapter: str, channel: str, user: str, counts: Counts,
                     at: float | None = None) -> bool:
        """Add one job's counts under its channel, its user and the pair; False when the job was
        counted already (nothing is added then)."""
        s = self.settings
        day = day_of(time.time() if at is None else at)
        members = [["channel", adapter, channel], ["user", adapter, user], ["pair", adapter, channel, user]]
        keys = [s.key("usage-done", job_id), s.key("usage", day, "index"),
                *(s.key("usage", day, *m) for m in members)]
        args: list[str | int] = [s.idempotency_ttl_s, s.usage_retention_days * 86_400,
                                 *(json.dumps(m) for m in members)]
        for name in FIELDS:
            args += [name, int(getattr(counts, name))]
        return bool(await self._script(keys=keys, args=args))


@dataclass
class Row:
    kind: str  # channel | user
    adapter: str
    name: str
    counts: Counts


@dataclass
class Report:
    since: date
    until: date
    channels: list[Row]
    users: list[Row]
    total: Counts

    def as_dict(self) -> dict[str, Any]:
        def rows(items: list[Row], what: str) -> list[dict[str, Any]]:
            return [{"adapter": r.adapter, what: r.name, **r.counts.as_dict()} for r in items]

        return {"since": self.since.isoformat(), "until": self.until.isoformat(),
                "channels": rows(self.channels, "channel"), "users": rows(self.users, "user"),
                "total": self.total.as_dict()}


def _matches(want: str | None, adapter: str, name: str) -> bool:
    """``--channel C`` / ``--user U``: the id alone, or ``adapter:id``."""
    return want is None or want in (name, f"{adapter}:{name}")


def days_between(since: date, until: date) -> list[date]:
    return [since + timedelta(days=n) for n in range((until - since).days + 1)]


async def read(redis: aioredis.Redis, settings: Settings, since: date, until: date, *,
               channel: str | None = None, user: str | None = None) -> Report:
    """The counts of the UTC days ``since``..``until`` (both included), per channel, per user
    and in total, each list sorted by jobs. With ``channel`` or ``user`` the rows are those of the
    matching pairs: a user's use within one channel, a channel's use by one user."""
    days = days_between(since, until)
    async with redis.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.smembers(settings.key("usage", day.isoformat(), "index"))
        indexes = await pipe.execute()
    wanted: list[tuple[str, list[str]]] = []
    for day, members in zip(days, indexes, strict=True):
        for raw in members:
            member = json.loads(raw)
            wanted.append((settings.key("usage", day.isoformat(), *member), member))
    async with redis.pipeline(transaction=False) as pipe:
        for key, _ in wanted:
            pipe.hgetall(key)
        hashes = await pipe.execute()
    channels: dict[tuple[str, str], Counts] = {}
    users: dict[tuple[str, str], Counts] = {}
    filtered = channel is not None or user is not None
    for (_, member), raw in zip(wanted, hashes, strict=True):
        if not raw:
            continue  # expired between the two reads
        kind, adapter = member[0], member[1]
        counts = Counts.from_hash(raw)
        if kind == "pair" and filtered:
            ch, us = member[2], member[3]
            if _matches(channel, adapter, ch) and _matches(user, adapter, us):
                channels.setdefault((adapter, ch), Counts()).add(counts)
                users.setdefault((adapter, us), Counts()).add(counts)
        elif kind == "channel" and not filtered:
            channels.setdefault((adapter, member[2]), Counts()).add(counts)
        elif kind == "user" and not filtered:
            users.setdefault((adapter, member[2]), Counts()).add(counts)
    total = Counts()
    for counts in channels.values():
        total.add(counts)
    return Report(since, until, _sorted("channel", channels.items()), _sorted("user", users.items()), total)


def _sorted(kind: str, items: Iterable[tuple[tuple[str, str], Counts]]) -> list[Row]:
    rows = [Row(kind, adapter, name, counts) for (adapter, name), counts in items]
    return sorted(rows, key=lambda r: (-r.counts.jobs, r.adapter, r.name))
