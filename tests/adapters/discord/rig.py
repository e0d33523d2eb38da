"""Discord test rig: gateway payloads fed through discord.py's own ConnectionState parsers (no
stand-ins for discord.py classes), and helpers to wait for jobs.

Keep ``tests/adapters/__init__.py``: without it this folder's ``__init__.py`` would make
``discord`` a top-level test package on sys.path, shadowing discord.py itself.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from bot.adapters.discord.client import CodeloopBot
from bot.core.jobs import Job
from bot.core.settings import Settings
from tests.fakes.discord_api import FakeDiscord, user_json

ALICE = 1400000000000000001
BOB = 1400000000000000002
OTHER_BOT = 1400000000000000003
EVERYONE_PERMS = (1 << 10) | (1 << 11) | (1 << 38) | (1 << 31)  # view, send, send in threads, use commands
MANAGE_MESSAGES = 1 << 13
NAMES = {ALICE: "alice", BOB: "bob", OTHER_BOT: "otherbot"}


class Gateway:
    """What Discord's gateway would deliver, parsed by the bot's own ConnectionState."""

    def __init__(self, fake: FakeDiscord, bot: CodeloopBot) -> None:
        self.fake = fake
        self.bot = bot

    def member(self, user_id: int, permissions: int = EVERYONE_PERMS) -> dict[str, Any]:
        return {"user": user_json(user_id, NAMES[user_id], bot=user_id == OTHER_BOT), "roles": [], "nick": None,
                "avatar": None, "joined_at": datetime.now(UTC).isoformat(), "deaf": False, "mute": False,
                "flags": 0, "pending": False, "communication_disabled_until": None, "permissions": str(permissions)}

    def text_channel(self, channel_id: int | None = None) -> dict[str, Any]:
        return {"id": str(channel_id or self.fake.channel_id), "type": 0, "guild_id": str(self.fake.guild_id),
                "name": "analytics", "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None,
                "topic": None, "last_message_id": None, "rate_limit_per_user": 0, "flags": 0}

    def thread_channel(self, thread_id: int | str, parent_id: int | None = None) -> dict[str, Any]:
        return {"id": str(thread_id), "type": 11, "guild_id": str(self.fake.guild_id), "name": "thread",
                "parent_id": str(parent_id or self.fake.channel_id), "owner_id": str(self.fake.application_id),
                "last_message_id": None, "rate_limit_per_user": 0, "message_count": 1, "member_count": 2,
                "flags": 0, "thread_metadata": {"archived": False, "locked": False, "auto_archive_duration": 1440,
                                                "archive_timestamp": datetime.now(UTC).isoformat()}}

    def guild_create(self) -> dict[str, Any]:
        gid = str(self.fake.guild_id)
        return {"id": gid, "name": "Data team", "icon": None, "owner_id": str(ALICE), "afk_timeout": 300,
                "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
                "mfa_level": 0, "features": [], "emojis": [], "stickers": [], "premium_tier": 0,
                "preferred_locale": "en-US", "nsfw_level": 0, "system_channel_flags": 0, "unavailable": False,
                "roles": [{"id": gid, "name": "@everyone", "permissions": str(EVERYONE_PERMS), "position": 0,
                           "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
                "channels": [self.text_channel()], "threads": [], "members": [], "member_count": 3,
                "large": False, "voice_states": [], "presences": [], "stage_instances": [],
                "guild_scheduled_events": [], "joined_at": datetime.now(UTC).isoformat()}

    def _interaction(self, kind: int, user: int, channel: dict[str, Any], data: dict[str, Any],
                     permissions: int = EVERYONE_PERMS, **extra: Any) -> dict[str, Any]:
        iid = self.fake.snowflake()
        token = f"aW50ZXJhY3Rpb246{iid}OnRva2Vu"  # base64url, as real tokens are
        payload = {"id": str(iid), "application_id": str(self.fake.application_id), "type": kind, "token": token,
                "version": 1, "guild_id": str(self.fake.guild_id), "channel_id": channel["id"], "channel": channel,
                "guild": {"id": str(self.fake.guild_id), "locale": "en-US", "features": []},
                "member": self.member(user, permissions), "app_permissions": str(EVERYONE_PERMS | (1 << 35)),
                "locale": "en-US", "guild_locale": "en-US", "entitlements": [], "context": 0,
                "authorizing_integration_owners": {"0": str(self.fake.guild_id)},
                "attachment_size_limit": 10 * 1024 * 1024, "data": data, **extra}
        self.fake.interactions[token] = payload  # so its responses land in its channel
        return payload

    def slash(self, user: int, prompt: str, file: dict[str, Any] | None = None,
              channel: dict[str, Any] | None = None) -> dict[str, Any]:
        options: list[dict[str, Any]] = [{"name": "prompt", "type": 3, "value": prompt}]
        data: dict[str, Any] = {"id": "1500000000000000001", "name": "code", "type": 1, "options": options}
        if file is not None:
            options.append({"name": "file", "type": 11, "value": file["id"]})
            data["resolved"] = {"attachments": {file["id"]: file}}
        return self._interaction(2, user, channel or self.text_channel(), data)

    def button(self, user: int, message: dict[str, Any], custom_id: str,
               permissions: int = EVERYONE_PERMS) -> dict[str, Any]:
        channel = self.thread_channel(message["channel_id"])
        return self._interaction(3, user, channel, {"custom_id": custom_id, "component_type": 2},
                                 permissions, message=message)

    def message(self, user: int, channel_id: int | str, content: str,
                attachments: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        member = self.member(user)
        author = member.pop("user")
        return self.fake.message(channel_id, content, author=author, member=member,
                                 attachments=attachments or [], **extra)

    def reply(self, user: int, channel_id: int | str, content: str, to: dict[str, Any], *, resolved: bool = True,
              **extra: Any) -> dict[str, Any]:
        """A message replying to ``to``, as the gateway sends it: with the referenced message as it
        stands in the fake (null once deleted) when ``resolved``, without it otherwise."""
        ref = {"type": 0, "message_id": to["id"], "channel_id": str(channel_id), "guild_id": str(self.fake.guild_id)}
        if resolved:
            linked = self.fake.messages.get(int(to["id"]))
            extra["referenced_message"] = ({k: v for k, v in linked.items() if k != "referenced_message"}
                                           if linked is not None else None)
        return self.message(user, channel_id, content, message_reference=ref, type=19, **extra)

    def said(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A message that was posted before the test: in the fake's store (REST reads find it)."""
        self.fake.messages[int(payload["id"])] = payload
        return payload

    def mention(self) -> str:
        return f"<@{self.fake.application_id}>"

    def known_thread(self, thread_id: int | str) -> None:
        """A thread the bot has seen created (THREAD_CREATE), someone else's."""
        self.bot._connection.parse_thread_create(self.thread_channel(thread_id))  # type: ignore[arg-type]

    # --- delivery ---------------------------------------------------------------------------------
    def interaction(self, payload: dict[str, Any]) -> None:
        self.bot._connection.parse_interaction_create(payload)  # type: ignore[arg-type]

    def send_message(self, payload: dict[str, Any]) -> None:
        self.bot._connection.parse_message_create(payload)  # type: ignore[arg-type]


async def next_job(redis: aioredis.Redis, settings: Settings, after: str = "0") -> tuple[str, Job]:
    """The next job enqueued after stream id ``after`` (waits up to 10 s)."""
    for _ in range(200):
        entries = await redis.xrange(settings.key("jobs"), min=f"({after}" if after != "0" else "-", count=1)
        if entries:
            entry_id, fields = entries[0]
            return entry_id.decode(), Job.loads(fields[b"job"])
        await asyncio.sleep(0.05)
    raise AssertionError("no job was enqueued")
