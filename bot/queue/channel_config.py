"""Per-channel settings that a channel's admins set (Slack ``/codeloop``, Discord ``/codeloop-config``).

One Redis hash per channel, no TTL (a channel's settings last until an admin resets them):

    chancfg:<platform>:<channel id>   rounds   max feedback rounds, 0..CODELOOP_MAX_ROUNDS
                                      prompt   one extra system-prompt line
                                      enabled  "1" | "0"
                                      profile  a CODELOOP_MODEL_PROFILES name
                                      by, at   who changed it last, and when (shown by the command)

A missing field means the operator's default. Adapters write it and check ``enabled`` before
taking a request; the worker reads the whole hash once per job (``get``: one HGETALL) and applies
it. Values are checked when written (``parse_value``) and again, leniently, when read: the
operator may have lowered CODELOOP_MAX_ROUNDS or removed a profile since.
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from bot.core.errors import InputRejected
from bot.core.limits import encodable_text
from bot.core.settings import DEFAULT_PROFILE, Settings

Field = Literal["rounds", "prompt", "profile", "enabled"]
FIELDS: tuple[Field, ...] = ("rounds", "prompt", "profile", "enabled")
#: the extra system-prompt line: one line, at most this many characters
PROMPT_CHARS = 300
#: how long an adapter trusts an ``enabled`` it read (another replica's change shows within this)
ENABLED_CACHE_S = 2.0
#: what a request in a channel its admins turned off is told (by the adapter; the worker too)
CHANNEL_DISABLED = ("codeloop is turned off in this channel by its admins; ask one of them to turn it back on "
                    "(Slack: `/codeloop enable`, Discord: `/codeloop-config enable`).")
_SPACES = re.compile(r"\s+")
_ON = {"1", "on", "true", "yes", "enable", "enabled"}
_OFF = {"0", "off", "false", "no", "disable", "disabled"}


@dataclass(frozen=True)
class ChannelConfig:
    rounds: int | None = None  # None: CODELOOP_MAX_ROUNDS
    prompt: str = ""
    enabled: bool = True
    profile: str = DEFAULT_PROFILE
    by: str = ""
    at: float = 0.0

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> ChannelConfig:
        """The stored hash, read leniently: a field that does not parse counts as unset."""
        data = {_text(k): _text(v) for k, v in raw.items()}
        rounds = data.get("rounds", "")
        at = data.get("at", "")
        return cls(rounds=int(rounds) if rounds.isdigit() else None,
                   prompt=clean_prompt(data.get("prompt", ""))[:PROMPT_CHARS],
                   enabled=data.get("enabled", "1") != "0",
                   profile=data.get("profile") or DEFAULT_PROFILE,
                   by=data.get("by", ""),
                   at=float(at) if at.replace(".", "", 1).isdigit() else 0.0)

    @property
    def is_default(self) -> bool:
        return self.rounds is None and not self.prompt and self.enabled and self.profile == DEFAULT_PROFILE

    def max_rounds(self, settings: Settings) -> int:
        """The channel's rounds, never above the operator's CODELOOP_MAX_ROUNDS."""
        return settings.max_rounds if self.rounds is None else min(self.rounds, settings.max_rounds)

    def profile_name(self, settings: Settings) -> str:
        """The profile jobs here use: the chosen one while the operator still lists it."""
        return self.profile if self.profile in settings.profiles else DEFAULT_PROFILE

    def note(self, settings: Settings) -> str:
        """The status line's addition where jobs here differ from the defaults, e.g.
        ``model: big · up to 2 fixes``; "" where they do not."""
        parts = []
        if (profile := self.profile_name(settings)) != DEFAULT_PROFILE:
            parts.append(f"model: {profile}")
        if (rounds := self.max_rounds(settings)) != settings.max_rounds:
            parts.append("no fixes" if rounds == 0 else f"up to {rounds} fix{'es' if rounds != 1 else ''}")
        return " · ".join(parts)


def clean_prompt(text: str) -> str:
    """An admin's prompt line as the model gets it: cleaned like user text (no lone surrogates, no
    NUL), no control or format characters (bidi overrides…), all whitespace runs one space."""
    text = encodable_text(text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    return _SPACES.sub(" ", text).strip()


def parse_value(field: str, value: str, settings: Settings) -> str:
    """The stored form of ``value`` for ``field``; InputRejected with a message for the admin
    when it is not allowed."""
    value = value.strip()
    if field == "rounds":
        top = settings.max_rounds
        if not value.isdigit() or int(value) > top:
            raise InputRejected(f"rounds must be a whole number from 0 to {top} (the operator's maximum); "
                                f"got `{value[:20]}`.")
        return str(int(value))
    if field == "prompt":
        line = clean_prompt(value)
        if len(line) > PROMPT_CHARS:
            raise InputRejected(f"The prompt line is {len(line)} characters; the limit is {PROMPT_CHARS}.")
        return line
    if field == "profile":
        name = value.lower()
        names = sorted(settings.profiles)
        if name != DEFAULT_PROFILE and name not in names:
            offered = ", ".join([DEFAULT_PROFILE, *names])
            raise InputRejected(f"There is no model profile `{value[:40]}`; choose one of: {offered}.")
        return name
    if field == "enabled":
        if value.lower() in _ON:
            return "1"
        if value.lower() in _OFF:
            return "0"
        raise InputRejected("enabled is on or off.")
    raise InputRejected(f"There is no setting `{field[:20]}`; settings: {', '.join(FIELDS)}.")


class ChannelConfigs:
    def __init__(self, redis: aioredis.Redis[Any], settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._enabled: dict[str, tuple[float, bool]] = {}
        #: reads in flight: a burst of requests in one channel shares one HGET
        self._reading: dict[str, asyncio.Future[bool]] = {}

    def key(self, platform: str, channel: str) -> str:
        return self.settings.key("chancfg", platform, channel)

    async def get(self, platform: str, channel: str) -> ChannelConfig:
        return ChannelConfig.from_hash(await self.redis.hgetall(self.key(platform, channel)))

    async def set(self, platform: str, channel: str, field: str, value: str, by: str) -> ChannelConfig:
        """Check and store one setting (``parse_value``); the channel's settings after it."""
        stored = parse_value(field, value, self.settings)
        key = self.key(platform, channel)
        async with self.redis.pipeline(transaction=True) as pipe:
            if field == "prompt" and not stored:
                pipe.hdel(key, "prompt")
            else:
                pipe.hset(key, field, stored)
            pipe.hset(key, mapping={"by": by, "at": f"{time.time():.0f}"})
            pipe.hgetall(key)
            *_, raw = await pipe.execute()
        self._enabled.pop(key, None)
        return ChannelConfig.from_hash(raw)

    async def reset(self, platform: str, channel: str) -> None:
        key = self.key(platform, channel)
        await self.redis.delete(key)
        self._enabled.pop(key, None)

    async def enabled(self, platform: str, channel: str) -> bool:
        """Whether the channel takes requests; read at most every ``ENABLED_CACHE_S`` per channel,
        and once for a burst (an adapter asks on every request, on its ack path; this replica's
        own changes apply at once)."""
        key = self.key(platform, channel)
        hit = self._enabled.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        reading = self._reading.get(key)
        if reading is not None:
            return await asyncio.shield(reading)
        reading = self._reading[key] = asyncio.get_running_loop().create_future()
        try:
            on = await self.redis.hget(key, "enabled") not in (b"0", "0")
        except asyncio.CancelledError:
            reading.cancel()
            raise
        except Exception as exc:
            reading.set_exception(exc)
            reading.exception()  # marked retrieved: those waiting get it, nobody else needs to
            raise
        finally:
            self._reading.pop(key, None)
        if len(self._enabled) > 10_000:
            self._enabled.clear()
        self._enabled[key] = (time.monotonic() + ENABLED_CACHE_S, on)
        reading.set_result(on)
        return on


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
