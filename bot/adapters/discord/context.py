"""What was said before the bot was asked, for the model: on Discord, two kinds.

* ``thread_context``: a thread's earlier messages, when ``/code`` (or a mention) is first used
  inside a thread codeloop is not in yet; read with the channel's message history.
* ``reply_context``: when the request is a reply, the message it replies to and the chain of
  replies that one answers in turn, newest first: the referenced message as the gateway resolved
  it, else (and for each older link) fetched by id.

Both need Read Message History, are bounded by ``CODELOOP_THREAD_CONTEXT_MESSAGES`` / ``_CHARS``
with the newest kept, name each line's author (display name; the bot itself is "codeloop (you)")
and list attached files by name (nothing is downloaded). A read that fails or takes longer than
``FETCH_TIMEOUT_S`` only means no context (or, for a chain, the part read by then); a deleted
message ends a chain.
"""

from __future__ import annotations

import asyncio
import logging

import discord

from bot.core.jobs import encodable

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0  # after the interaction's deferral (or for a message, which has no deadline)
BOT_NAME = "codeloop (you)"
#: ends a reply chain's lines, so the model knows which message the request answers
REPLY_NOTE = "(the request below is a reply to the last of these messages)"


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


async def reply_context(message: discord.Message, bot_user_id: int | None, *, max_messages: int,
                        max_chars: int) -> str:
    """The messages ``message`` replies to, oldest first, as ``Name: text`` lines ending with
    ``REPLY_NOTE``; "" when it is no reply or nothing of the chain could be read."""
    if max_messages <= 0 or max_chars <= 0 or message.reference is None:
        return ""
    chain: list[discord.Message] = []  # newest first; what was read before a timeout is kept
    try:
        await asyncio.wait_for(_follow(message, chain, max_messages), FETCH_TIMEOUT_S)
    except (TimeoutError, discord.HTTPException) as exc:
        log.warning("reply context for %s cut short: %r", message.id, exc)
    lines: list[str] = []
    used = len(REPLY_NOTE)
    for linked in chain:
        line = _line(linked, bot_user_id)
        if not line:
            continue
        if used + len(line) + 1 > max_chars:
            room = max_chars - used - 1  # the newest message alone is too long: its end is kept
            if not lines and room > 1:
                lines.append("…" + line[-(room - 1):])
            break
        lines.append(line)
        used += len(line) + 1
    if not lines:
        return ""
    lines.reverse()
    return "\n".join([*lines, REPLY_NOTE])


async def _follow(message: discord.Message, chain: list[discord.Message], max_messages: int) -> None:
    """Walk the replies back from ``message``, appending each referenced message to ``chain``."""
    seen = {message.id}
    current = message
    while len(chain) < max_messages:
        ref = current.reference
        if (ref is None or ref.type is not discord.MessageReferenceType.reply or ref.message_id is None
                or ref.message_id in seen):
            return  # no reply (a forward carries a copy, not a conversation), or a loop
        linked = ref.resolved or ref.cached_message
        if isinstance(linked, discord.DeletedReferencedMessage):
            return
        if linked is None:
            if ref.channel_id != current.channel.id:
                return
            try:
                linked = await current.channel.fetch_message(ref.message_id)
            except (discord.NotFound, discord.Forbidden):
                return  # deleted since, or not ours to read: the chain ends here
        seen.add(linked.id)
        chain.append(linked)
        current = linked


def _line(message: discord.Message, bot_user_id: int | None) -> str:
    author = BOT_NAME if message.author.id == bot_user_id else message.author.display_name
    text = encodable(message.clean_content).strip()
    files = [a.filename for a in message.attachments]
    if files:
        text += ("\n" if text else "") + f"[shared files: {', '.join(files)}]"
    return f"{author}: {text}" if text else ""
