"""Rendering a job's events into its Discord thread, through discord.py's REST client.

Per job the thread shows, in order: the status message (a reply to the request, carrying Stop;
edited to the outcome and Re-run at the end), then for each round the model's streamed text
(edited about once a second, split over several messages past 2,000 characters), the output
of its code and the files it made. Everything goes through the bot token, never the
interaction token, because that one expires after 15 minutes and a job may run longer.

The in-memory state per job is only an optimisation for edits: after a restart the next events
of a running job start a fresh segment, and the status message is found again from the meta
the job carries on every event.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.adapters.common import code_block, split_message
from bot.adapters.discord import format as fmt
from bot.adapters.discord.store import DiscordStore
from bot.adapters.discord.views import finished_view
from bot.adapters.ownership import Ownership
from bot.core.jobs import Event
from bot.queue.blobs import BlobStore, missing_note

log = logging.getLogger(__name__)

EDIT_INTERVAL_S = 1.0  # Discord tolerates about five edits per 5 s per channel; stay well below


@dataclass
class _Reply:
    channel: discord.PartialMessageable
    status_id: int | None
    text: str = ""  # the current segment: one round's model text
    round: object = None
    messages: list[discord.PartialMessage] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # content each of ``messages`` shows now
    status: str | None = None  # status line not yet shown
    streamed: bool = False
    dirty: bool = False  # text or status changed since the last flush
    uploads: list[fmt.Upload] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # files that could not be shown, and why
    last_edit: float = 0.0
    timer: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Renderer:
    def __init__(self, client: discord.Client, store: DiscordStore, edit_interval_s: float = EDIT_INTERVAL_S,
                 file_limit: int = fmt.FILE_LIMIT) -> None:
        self.client = client
        self.store = store
        self.edit_interval_s = edit_interval_s
        self.file_limit = file_limit
        self.blobs = BlobStore(store.redis, store.settings)
        self._replies: dict[str, _Reply] = {}
        #: told when a job ends, so typed ``stop`` no longer finds it
        self.ownership = Ownership(store.redis, store.settings)

    async def handle(self, event: Event) -> None:
        """ReplyReader's handler: one event, rendered once (the reader dedupes by job and seq)."""
        reply = self._reply(event)
        if reply is None:
            log.warning("event %s #%d has no Discord thread in its meta; dropped", event.job_id, event.seq)
            return
        payload = event.payload
        if event.type == "delta":
            await self._delta(reply, payload)
        elif event.type == "status":
            reply.status = fmt.status_line(str(payload.get("text") or ""), payload.get("setup"))
            reply.dirty = True
            await self._schedule(reply)
        elif event.type in ("image", "file"):
            # a blob is taken (fetched and deleted) now: this event is rendered once
            data = await self.blobs.payload_bytes(payload)
            if data is not None:
                reply.uploads.append(fmt.Upload(str(payload.get("name") or "file").replace("/", "_"), data))
            elif payload.get("skipped") or payload.get("blob"):
                reply.notes.append(missing_note(payload))
            else:
                log.warning("undecodable attachment %r dropped", payload.get("name"))
        else:
            async with reply.lock:
                await self._flush(reply)
                if event.type == "code":
                    await self._code(reply, payload)
                elif event.type == "output":
                    await self._send_uploads(reply)
                    content, upload = fmt.output_message(payload)
                    await self._send(reply, content, [upload] if upload else [])
                elif event.terminal:
                    await self._finish(event, reply)

    def _reply(self, event: Event) -> _Reply | None:
        reply = self._replies.get(event.job_id)
        if reply is None:
            thread_id = event.meta.get("thread_id")
            if not thread_id:
                return None
            guild_id = event.meta.get("guild_id")
            gid = int(guild_id) if guild_id else None
            channel = self.client.get_partial_messageable(int(thread_id), guild_id=gid,
                                                          type=discord.ChannelType.public_thread)
            status = event.meta.get("status_message_id")
            reply = _Reply(channel, int(status) if status else None)
            self._replies[event.job_id] = reply
        return reply

    # --- streamed text -----------------------------------------------------------------------
    async def _delta(self, reply: _Reply, payload: dict[str, Any]) -> None:
        if reply.uploads or reply.notes or (reply.text and payload.get("round") != reply.round):
            async with reply.lock:  # a new round (or files in between) starts new messages below
                await self._flush(reply)
                await self._send_uploads(reply)
                self._close_segment(reply)
        reply.round = payload.get("round")
        reply.text += str(payload.get("text") or "")
        reply.streamed = reply.dirty = True
        await self._schedule(reply)

    async def _code(self, reply: _Reply, payload: dict[str, Any]) -> None:
        code = str(payload.get("code") or "")
        # The code normally arrived inside the streamed reply; show it only if it did not.
        if code.strip() and code.strip() not in reply.text:
            block = code_block(code, str(payload.get("language") or "python"))
            reply.text += ("\n" if reply.text else "") + block
            await self._flush(reply)
        self._close_segment(reply)

    async def _schedule(self, reply: _Reply) -> None:
        """Show pending text now if the last edit is old enough, else once it is."""
        wait = reply.last_edit + self.edit_interval_s - time.monotonic()
        if wait <= 0 and not reply.lock.locked():
            async with reply.lock:
                await self._flush(reply)
        elif reply.timer is None or reply.timer.done():
            reply.timer = asyncio.create_task(self._later(reply, max(wait, 0.0)))

    async def _later(self, reply: _Reply, wait: float) -> None:
        while True:
            await asyncio.sleep(wait)
            try:
                async with reply.lock:
                    if reply.dirty:
                        await self._flush(reply)
            except Exception:  # a failed edit must not kill later ones; the next flush retries
                log.exception("delayed edit failed")
            # Events that arrived while this flush ran were not shown yet: go round again.
            if not reply.dirty:
                return
            wait = self.edit_interval_s

    async def _flush(self, reply: _Reply) -> None:
        """Bring the status message and the current segment's messages up to date."""
        reply.dirty = False
        if reply.status is not None and reply.status_id is not None:
            status, reply.status = reply.status, None
            await self._edit_status(reply, status, None)
        chunks = fmt.stream_chunks(reply.text)
        for i, chunk in enumerate(chunks):
            if i < len(reply.messages):
                if reply.shown[i] != chunk:
                    try:
                        await reply.messages[i].edit(content=chunk)
                    except discord.NotFound:  # someone deleted it: post the chunk again instead
                        reply.messages[i] = await self._post(reply, chunk)
                    reply.shown[i] = chunk
            else:
                reply.messages.append(await self._post(reply, chunk))
                reply.shown.append(chunk)
        reply.last_edit = time.monotonic()

    def _close_segment(self, reply: _Reply) -> None:
        reply.text, reply.messages, reply.shown = "", [], []

    # --- messages and files --------------------------------------------------------------------
    async def _post(self, reply: _Reply, content: str,
                    uploads: list[fmt.Upload] | None = None) -> discord.PartialMessage:
        files = [discord.File(io.BytesIO(u.data), filename=u.name) for u in uploads or []]
        if files:
            message = await reply.channel.send(content=content or None, files=files)
        else:
            message = await reply.channel.send(content=content)
        return reply.channel.get_partial_message(message.id)

    async def _send(self, reply: _Reply, content: str, uploads: list[fmt.Upload]) -> None:
        self._close_segment(reply)
        for chunk in split_message(content, fmt.MESSAGE_LIMIT)[:-1]:
            await self._post(reply, chunk)
        await self._post(reply, split_message(content, fmt.MESSAGE_LIMIT)[-1], uploads)

    async def _send_uploads(self, reply: _Reply) -> None:
        if not reply.uploads and not reply.notes:
            return
        batches, notes = fmt.batch_uploads(reply.uploads, max_bytes=self.file_limit)
        notes = [*reply.notes, *notes]
        reply.uploads, reply.notes = [], []
        self._close_segment(reply)
        for batch in batches:
            await self._post(reply, "", batch)
        if notes:
            await self._send(reply, "\n".join(notes), [])

    async def _edit_status(self, reply: _Reply, content: str, view: discord.ui.View | None) -> None:
        assert reply.status_id is not None
        message = reply.channel.get_partial_message(reply.status_id)
        try:
            if view is None:
                await message.edit(content=content)  # components untouched: Stop stays
            else:
                await message.edit(content=content, view=view)
        except discord.NotFound:
            log.info("status message %s is gone; not updated", reply.status_id)

    async def _finish(self, event: Event, reply: _Reply) -> None:
        self._replies.pop(event.job_id, None)
        if reply.timer is not None:
            reply.timer.cancel()
        await self._send_uploads(reply)
        text = str(event.payload.get("text") or "")
        if event.type == "final" and text.strip() and not reply.streamed:
            # Nothing was streamed (a non-streaming backend): the answer arrives only here.
            for chunk in fmt.stream_chunks(text):
                await self._post(reply, chunk)
        line = fmt.final_line(event.payload) if event.type == "final" else fmt.error_line(event.payload)
        if reply.status_id is None:
            await self._post(reply, line)
        else:
            await self._edit_status(reply, line, finished_view(event.job_id))
        user = event.meta.get("user_id")
        if user:
            await self.store.release(str(user), event.job_id)
        await self.ownership.ended(event.conversation, event.job_id)
