"""A thread's earlier messages, for the model, when the bot is first mentioned inside it.

Read with ``conversations.replies`` (scopes ``channels:history`` / ``groups:history``), before the
job is enqueued, within ``FETCH_TIMEOUT_S`` so the ack stays inside Slack's 3 s: a slow or failed
read only means no context. Bounded by ``CODELOOP_THREAD_CONTEXT_MESSAGES`` and ``_CHARS``, the
newest kept; each line names its author (display name, else real name, else the user id) and lists
the files shared with it (names only: nothing is downloaded).
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.slack.render import SLACK_ERRORS
from bot.core.jobs import encodable

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 1.5
#: one page: Slack returns a thread oldest first, so the newest are the last of what it sends
PAGE = 200
MAX_AUTHORS = 10  # users.info lookups for authors whose name the messages do not carry
_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|([^>]*))?>")
BOT_NAME = "codeloop (you)"


async def thread_context(client: AsyncWebClient, channel: str, thread_ts: str, before_ts: str,
                         bot_user_id: str | None, *, max_messages: int, max_chars: int) -> str:
    """The thread's messages before ``before_ts`` as ``Name: text`` lines, "" when there are none
    or they could not be read in time."""
    if max_messages <= 0 or max_chars <= 0:
        return ""
    try:
        return await asyncio.wait_for(
            _read(client, channel, thread_ts, before_ts, bot_user_id, max_messages, max_chars), FETCH_TIMEOUT_S)
    except (TimeoutError, *SLACK_ERRORS) as exc:
        log.warning("thread context for %s/%s not read: %r", channel, thread_ts, exc)
        return ""


async def _read(client: AsyncWebClient, channel: str, thread_ts: str, before_ts: str, bot_user_id: str | None,
                max_messages: int, max_chars: int) -> str:
    resp = await client.conversations_replies(channel=channel, ts=thread_ts, limit=PAGE)
    messages = [m for m in resp.get("messages") or [] if isinstance(m, dict) and _before(m, before_ts)]
    omitted = max(len(messages) - max_messages, 0)
    messages = messages[-max_messages:] if max_messages else []
    names = _names(messages, bot_user_id)
    missing = {u for m in messages if (u := str(m.get("user") or "")) and u not in names}
    missing |= {u for m in messages for u in _MENTION.findall(str(m.get("text") or "")) if u not in names}
    names.update(await _lookup(client, sorted(missing)[:MAX_AUTHORS]))
    lines = [_line(m, names, bot_user_id) for m in messages]
    lines = [line for line in lines if line]
    kept: list[str] = []
    used = 0
    for line in reversed(lines):  # newest first, until the budget is spent
        if used + len(line) + 1 > max_chars:
            if not kept:
                kept.append("…" + line[-(max_chars - 1):])
            omitted += len(lines) - len(kept)
            break
        kept.append(line)
        used += len(line) + 1
    kept.reverse()
    if omitted and kept:
        kept.insert(0, f"({omitted} earlier message{'s' if omitted != 1 else ''} left out)")
    return "\n".join(kept)


def _before(message: dict[str, Any], before_ts: str) -> bool:
    """Slack's ts is "seconds.micros": compared as two integers (a float loses the micros)."""
    try:
        return _ts(str(message.get("ts"))) < _ts(before_ts)
    except ValueError:
        return False


def _ts(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros or 0)


def _names(messages: list[dict[str, Any]], bot_user_id: str | None) -> dict[str, str]:
    names: dict[str, str] = {bot_user_id: BOT_NAME} if bot_user_id else {}
    for m in messages:
        profile = m.get("user_profile") or {}
        name = profile.get("display_name") or profile.get("real_name") if isinstance(profile, dict) else None
        if m.get("user") and name:
            names.setdefault(str(m["user"]), str(name))
    return names


async def _lookup(client: AsyncWebClient, users: list[str]) -> dict[str, str]:
    async def one(user: str) -> tuple[str, str | None]:
        try:
            info = (await client.users_info(user=user)).get("user") or {}
        except SLACK_ERRORS:
            return user, None
        profile = info.get("profile") or {}
        return user, profile.get("display_name") or info.get("real_name") or info.get("name") or None
    found = await asyncio.gather(*(one(u) for u in users))
    return {u: str(n) for u, n in found if n}


def _line(message: dict[str, Any], names: dict[str, str], bot_user_id: str | None) -> str:
    user = str(message.get("user") or "")
    if user:
        author = names.get(user, user)
    else:  # another app's message (a bot_message without a user)
        author = str(message.get("username") or "an app")
    text = _MENTION.sub(lambda m: "@" + names.get(m.group(1), m.group(1)), str(message.get("text") or ""))
    text = _LINK.sub(lambda m: f"{m.group(2)} ({m.group(1)})" if m.group(2) else m.group(1), text)
    text = encodable(html.unescape(text)).strip()
    files = [str(f.get("name") or f.get("title") or "file") for f in message.get("files") or [] if isinstance(f, dict)]
    if files:
        text += ("\n" if text else "") + f"[shared files: {', '.join(files)}]"
    return f"{author}: {text}" if text else ""
