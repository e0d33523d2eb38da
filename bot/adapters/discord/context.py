"""A Discord thread's earlier messages, for the model, when ``/code`` is first used inside it.

Read with the channel's message history (REST, needs Read Message History), newest first and
bounded by ``CODELOOP_THREAD_CONTEXT_MESSAGES`` / ``_CHARS``, the newest kept; each line names its
author (display name) and lists attached files by name (nothing is downloaded). A read that fails
or takes longer than ``FETCH_TIMEOUT_S`` only means no context.
"""

from __future__ import annotations

import asyncio
import logging

import discord

from bot.core.jobs import encodable

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0  # after the interaction's deferral: no 3 s deadline here


async def thread_context(thread: discord.Thread, before: int, bot_user_id: int | None, *, max_messages: int,
                         max_chars: int) -> str:
    """The thread's messages older than the snowflake ``before`` (the command's own id: our
    deferral and replies are newer) as ``Name: text`` lines; "" when none or unreadable."""
    if max_messages <= 0 or max_chars <= 0:
        return ""
    try:
        return await asyncio.wait_for(_read(thread, before, bot_user_id, max_messages, max_chars), FETCH_TIMEOUT_S)
    except (TimeoutError, discord.HTTPException) as exc:
        log.warning("thread context for %s not read: %r", thread.id, exc)
        return ""


async def _read(thread: discord.Thread, before: int, bot_user_id: int | None, max_messages: int,
                max_chars: int) -> str:
    lines: list[str] = []
    used = 0
    async for message in thread.history(limit=max_messages, before=discord.Object(id=before)):  # newest first
        line = _line(message, bot_user_id)
        if not line:
            continue
        if used + len(line) + 1 > max_chars:
            if not lines:
                lines.append("…" + line[-(max_chars - 1):])
            break
        lines.append(line)
        used += len(line) + 1
    lines.reverse()
    return "\n".join(lines)


def _line(message: discord.Message, bot_user_id: int | None) -> str:
    author = "codeloop (you)" if message.author.id == bot_user_id else message.author.display_name
    text = encodable(message.clean_content).strip()
    files = [a.filename for a in message.attachments]
    if files:
        text += ("\n" if text else "") + f"[shared files: {', '.join(files)}]"
    return f"{author}: {text}" if text else ""
