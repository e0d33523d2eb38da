"""Discord input -> Jobs: the /code command, "@codeloop <task>" messages, messages in our threads,
and the buttons.

A mention of the bot in a message (outside our threads) asks like ``/code`` does, with the same
checks, answered in a thread hanging from that message (or, inside someone else's thread, in
that thread). A message that replies to another one, a mention or a message in our threads,
gives the model the message it replies to and the chain before it (``context.reply_context``).

Every path checks the cheap things first (allowlists, input limits, the user's free slots: one
Redis round trip) and then acknowledges the interaction, so Discord's 3 s deadline is met long
before a thread is created or anything is enqueued. Whatever goes wrong after the ack is told to
the user in the place they are looking at, and the slot they took is given back.

Stop, Re-run and reset belong to the job's requester (a reset: the conversation's starter) or a
moderator, someone with Manage Messages in the channel (``bot.adapters.ownership``); anyone else
is told so, ephemerally where Discord allows it (buttons; a typed word can only get a reply). A
Stop stops one job by its id. A moderator's Re-run of someone else's request runs its text only:
the requester's files are never fetched again for another user.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

import discord

from bot.adapters.common import is_allowed, parse_control
from bot.adapters.discord import format as fmt
from bot.adapters.discord.context import reply_context, thread_context
from bot.adapters.discord.store import DiscordStore
from bot.adapters.discord.views import running_view
from bot.adapters.ownership import Ownership, known, not_yours
from bot.core.errors import CodeloopError, InputRejected
from bot.core.jobs import Attachment, Conversation, Job, JobKind
from bot.core.limits import InputLimits, Upload, check_text, check_upload, partition_uploads
from bot.core.settings import Settings
from bot.queue.channel_config import CHANNEL_DISABLED, ChannelConfigs
from bot.queue.ratelimit import Refusal
from bot.queue.replies import reply_stream
from bot.queue.stream import JobQueue

log = logging.getLogger(__name__)

Messageable = discord.abc.Messageable
CONTROL_ELSEWHERE = "Type `stop` or `reset` inside the codeloop thread it is for."


def _attachment(att: discord.Attachment) -> Attachment:
    return Attachment(name=att.filename, size=att.size, mime=att.content_type or "application/octet-stream",
                      url=att.url, auth="discord")


def _upload(att: discord.Attachment) -> Upload:
    return Upload(att.filename, att.size, att.content_type or "application/octet-stream")


def _manages_messages(message: discord.Message) -> bool:
    """Manage Messages in the message's channel, when discord.py can tell from its cache (a
    thread it has not seen resolves to no permissions: such a moderator uses the buttons)."""
    if not isinstance(message.author, discord.Member):
        return False
    try:
        return message.channel.permissions_for(message.author).manage_messages
    except (discord.ClientException, AttributeError):
        return False


def _start_failure(exc: Exception) -> str:
    """What the user is told when a job could not be started. Discord's own refusals (missing
    permissions…) are theirs to fix and name no host of ours; anything else (a Redis error names
    its address) stays in the log."""
    if isinstance(exc, discord.HTTPException):
        return str(exc)
    if isinstance(exc, CodeloopError):
        return exc.user_message()
    return "something went wrong on our side; try again in a minute."


def _with_context(job: Job, context: str) -> Job:
    return job.model_copy(update={"context": context}) if context else job


class _Refusal(Exception):
    """The queue's admission refused a job (carries the refusal to the place that answers)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.user_message())
        self.refusal = refusal


class Intake:
    def __init__(self, client: discord.Client, settings: Settings, queue: JobQueue,
                 store: DiscordStore) -> None:
        self.client = client
        self.settings = settings
        self.queue = queue
        self.store = store
        self.ownership = Ownership(queue.redis, settings)
        self.limits = InputLimits.from_settings(settings)
        self.reply_stream = reply_stream(settings, "discord")
        #: per-channel settings (``/codeloop-config``); a channel turned off takes no requests
        self.channels = ChannelConfigs(queue.redis, settings)

    # --- checks --------------------------------------------------------------------------------
    def refusal(self, guild_id: int | None, *channel_ids: int | None) -> str | None:
        """Why this place may not use the bot, or None. A thread counts as its parent channel."""
        if guild_id is None:
            return "codeloop works in server channels, not in direct messages."
        if not is_allowed(self.settings.discord_allowed_guilds, str(guild_id)):
            return "codeloop is not enabled on this server."
        ids = [str(c) for c in channel_ids if c is not None]
        if not is_allowed(self.settings.discord_allowed_channels, *ids):
            return "codeloop is not enabled in this channel; ask an admin which channels it works in."
        return None

    async def _reserve(self, user_id: int, job_id: str) -> str | None:
        limit = self.settings.discord_user_concurrency
        if await self.store.reserve(str(user_id), job_id, limit):
            return None
        runs = "run" if limit == 1 else "runs"
        return (f"You already have {limit} {runs} going, the most allowed at once. Wait for one to finish, "
                "or press its Stop button, then try again.")

    async def _admit(self, job_id: str, user_id: int, guild_id: int | None, channel_id: int | None) -> Job | None:
        """The queue's admission for a message job (rate limits, the user's pending cap), before
        anything is posted. The admitted probe (for ``release_admission``), or raises ``Refused``."""
        probe = Job(id=job_id, idempotency_key="-", user=str(user_id), reply_stream=self.reply_stream,
                    conversation=Conversation(platform="discord", workspace=str(guild_id), channel=str(channel_id),
                                              thread="-"))
        refused = await self.queue.admit(probe)
        if refused is not None:
            await self.store.release(str(user_id), job_id)
            raise _Refusal(refused)
        return probe

    # --- /code ---------------------------------------------------------------------------------
    async def code(self, interaction: discord.Interaction[Any], prompt: str,
                   file: discord.Attachment | None) -> None:
        channel = interaction.channel
        parent = channel.parent_id if isinstance(channel, discord.Thread) else None
        problem = self.refusal(interaction.guild_id, interaction.channel_id, parent)
        try:
            text = check_text(prompt, self.limits, has_files=file is not None)
            if file is not None:
                check_upload(_upload(file), self.limits)
        except InputRejected as exc:
            problem = problem or exc.user_message()
        if not problem and not await self.channels.enabled("discord", str(parent or interaction.channel_id)):
            problem = CHANNEL_DISABLED
        job_id = uuid.uuid4().hex
        problem = problem or await self._reserve(interaction.user.id, job_id)
        admitted = None
        if not problem:
            try:
                admitted = await self._admit(job_id, interaction.user.id, interaction.guild_id,
                                             parent or interaction.channel_id)
            except _Refusal as refusal:
                problem = refusal.refusal.user_message()
        if problem:
            await interaction.response.send_message(problem, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        try:
            head = fmt.header(interaction.user.mention, text, [file.filename] if file else [])
            context = await self._context(channel, interaction.id)
            conversation, target = await self._thread(interaction, head, text)
            job = self._job(job_id, str(interaction.id), conversation, interaction.user.id, text,
                            [_attachment(file)] if file else [])
            if context:
                job = job.model_copy(update={"context": context})
            await self._start(job, target)
        except Exception as exc:
            await self.store.release(str(interaction.user.id), job_id)
            if admitted is not None:
                await self.queue.release_admission(admitted)
            log.exception("/code failed to start")
            await interaction.edit_original_response(content=f"⚠️ Could not start: {_start_failure(exc)}")

    async def _context(self, channel: object, before: int) -> str:
        """A thread's earlier messages when /code is first used inside it (not one of ours yet)."""
        if not isinstance(channel, discord.Thread) or await self.store.thread(channel.id) is not None:
            return ""
        bot_id = self.client.user.id if self.client.user else None
        return await thread_context(channel, before, bot_id, max_messages=self.settings.thread_context_messages,
                                    max_chars=self.settings.thread_context_chars)

    async def _thread(self, interaction: discord.Interaction[Any], head: str,
                      prompt: str) -> tuple[Conversation, Messageable]:
        """The conversation for this command: the thread it was used in, or a new thread hanging
        from the command's own reply (so the channel shows who asked what, once)."""
        channel = interaction.channel
        guild = str(interaction.guild_id)
        if isinstance(channel, discord.Thread):
            await interaction.edit_original_response(content=head)
            conversation = await self.store.thread(channel.id) or Conversation(
                platform="discord", workspace=guild, channel=str(channel.parent_id), thread=str(channel.id))
            await self.store.save_thread(channel.id, conversation)
            return conversation, channel
        message = await interaction.edit_original_response(content=head)
        return await self._thread_from(message, guild, str(interaction.channel_id), prompt)

    def _thread_of(self, conversation: Conversation) -> Messageable:
        """The thread a stored conversation lives in, without a REST call."""
        return self.client.get_partial_messageable(int(conversation.thread), guild_id=int(conversation.workspace),
                                                   type=discord.ChannelType.public_thread)

    async def _thread_from(self, message: discord.Message, guild: str, channel: str,
                           prompt: str) -> tuple[Conversation, discord.Thread]:
        """A thread started from ``message`` in ``channel``, recorded as ours."""
        thread = await message.create_thread(name=fmt.thread_name(prompt), auto_archive_duration=1440)
        conversation = Conversation(platform="discord", workspace=guild, channel=channel, thread=str(thread.id))
        await self.store.save_thread(thread.id, conversation)
        return conversation, thread

    # --- messages in our threads ---------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id is not None:
            return  # other bots (and our own replies) never start a job
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        conversation = await self.store.thread(message.channel.id)
        if conversation is None:
            if self._mentions_me(message):
                await self._mention(message)
            return  # otherwise: not for us
        if self.refusal(int(conversation.workspace), int(conversation.channel), message.channel.id):
            log.info("message in thread %s ignored: no longer allowed", message.channel.id)
            return
        kind, text = parse_control(self._without_me(message.content))
        if kind == "stop":
            await self._typed_stop(message, conversation)
            return
        if kind == "message" and not await self.channels.enabled("discord", conversation.channel):
            await message.reply(CHANNEL_DISABLED)
            return
        accepted, refused = partition_uploads(((a, _upload(a)) for a in message.attachments), self.limits)
        try:
            text = text if kind == "reset" else check_text(text, self.limits, has_files=bool(accepted))
        except InputRejected as exc:
            if text.strip() or refused:  # an empty message with nothing usable is not worth an answer
                await message.reply(fmt.inert("\n".join([*refused, exc.user_message()] if text.strip() else refused)))
            return
        if refused:
            await message.reply(fmt.inert("\n".join(refused)))
        job_id = uuid.uuid4().hex
        job = self._job(job_id, str(message.id), conversation, message.author.id, text,
                        [_attachment(a) for a in accepted], kind)
        if kind == "reset":
            refusal = await self.ownership.check_reset(job, known(_manages_messages(message)), fmt.mention)
            if refusal:
                await message.reply(refusal)
                return
        busy = await self._reserve(message.author.id, job_id)
        if busy:
            await message.reply(busy)
            return
        turned_away = await self.queue.admit(job)
        if turned_away is not None:  # one "slow down" per window; the rest of a flood is dropped quietly
            await self.store.release(str(message.author.id), job_id)
            if turned_away.notify:
                await message.reply(turned_away.user_message())
            return
        try:
            if kind == "message":
                job = _with_context(job, await self._reply_context(message))
            await self._start(job, message.channel, reference=message)
        except Exception:
            await self.store.release(str(message.author.id), job_id)
            await self.queue.release_admission(job)
            raise

    # --- "@codeloop <task>" outside our threads ---------------------------------------------------
    def _mentions_me(self, message: discord.Message) -> bool:
        """The bot is named in the text (a reply's ping alone does not ask anything)."""
        return self.client.user is not None and self.client.user.id in message.raw_mentions

    def _without_me(self, content: str) -> str:
        if self.client.user is None:
            return content
        me = self.client.user.id
        return content.replace(f"<@{me}>", " ").replace(f"<@!{me}>", " ").strip()

    async def _mention(self, message: discord.Message) -> None:
        """A request by mention, checked like /code: allowlists, input limits, the user's slots
        and the queue's admission, before anything is created. Refusals are replies (Discord has
        no private answer to a message)."""
        channel = message.channel
        if not isinstance(channel, discord.TextChannel | discord.Thread):
            log.info("mention in channel %s ignored: not a text channel or thread in the cache", channel.id)
            return
        if not isinstance(channel, discord.Thread) and await self.store.thread(message.id) is not None:
            return  # redelivered: its thread (which takes the message's id) is ours already
        parent = channel.parent_id if isinstance(channel, discord.Thread) else None
        problem = self.refusal(message.guild.id if message.guild else None, channel.id, parent)
        if not problem and not await self.channels.enabled("discord", str(parent or channel.id)):
            problem = CHANNEL_DISABLED  # turned off by its admins (/codeloop-config disable)
        if problem:
            await message.reply(problem)
            return
        kind, text = parse_control(self._without_me(message.content))
        if kind != "message":
            await message.reply(CONTROL_ELSEWHERE)
            return
        accepted, refused = partition_uploads(((a, _upload(a)) for a in message.attachments), self.limits)
        try:
            text = check_text(text, self.limits, has_files=bool(accepted))
        except InputRejected as exc:
            await message.reply(fmt.inert("\n".join([*refused, exc.user_message()])))
            return
        if refused:
            await message.reply(fmt.inert("\n".join(refused)))
        job_id = uuid.uuid4().hex
        problem = await self._reserve(message.author.id, job_id)
        if problem:
            await message.reply(problem)
            return
        try:
            admitted = await self._admit(job_id, message.author.id, channel.guild.id, parent or channel.id)
        except _Refusal as refusal:  # (_admit released the reservation)
            if refusal.refusal.notify:
                await message.reply(refusal.refusal.user_message())
            return
        try:
            context = await self._reply_context(message) or await self._context(channel, message.id)
            conversation, target = await self._mention_thread(message, channel, text)
            job = self._job(job_id, str(message.id), conversation, message.author.id, text,
                            [_attachment(a) for a in accepted])
            await self._start(_with_context(job, context), target,
                              reference=message if target is channel else None)
        except Exception as exc:
            await self.store.release(str(message.author.id), job_id)
            if admitted is not None:
                await self.queue.release_admission(admitted)
            log.exception("a mention failed to start")
            await message.reply(f"⚠️ Could not start: {_start_failure(exc)}")

    async def _mention_thread(self, message: discord.Message, channel: discord.TextChannel | discord.Thread,
                              prompt: str) -> tuple[Conversation, Messageable]:
        """Someone else's thread is answered in; a channel gets a thread from the message."""
        guild = str(channel.guild.id)
        if isinstance(channel, discord.Thread):
            conversation = Conversation(platform="discord", workspace=guild, channel=str(channel.parent_id),
                                        thread=str(channel.id))
            await self.store.save_thread(channel.id, conversation)
            return conversation, channel
        return await self._thread_from(message, guild, str(channel.id), prompt)

    async def _reply_context(self, message: discord.Message) -> str:
        bot_id = self.client.user.id if self.client.user else None
        return await reply_context(message, bot_id, max_messages=self.settings.thread_context_messages,
                                   max_chars=self.settings.thread_context_chars)


    # --- buttons (views.Controls) --------------------------------------------------------------
    async def stop(self, interaction: discord.Interaction[Any], job_id: str) -> None:
        job = await self.store.job(job_id)
        problem = None if job is not None else "That run is too old to stop."
        if job is not None:
            problem = self._place_refusal(job.conversation) or self._not_owner(interaction, job, "stop")
        if problem or job is None:
            await interaction.response.send_message(problem or "", ephemeral=True)
            return
        # An ephemeral ack, not an edit: the job's final event edits this message, and an edit of
        # ours landing after it would overwrite the outcome.
        await interaction.response.send_message("⏹ Stopping…", ephemeral=True)
        await self._stop(job.conversation, str(interaction.id), interaction.user.id, job.meta, target=job.id)

    async def rerun(self, interaction: discord.Interaction[Any], job_id: str) -> None:
        old = await self.store.job(job_id)
        if old is None:
            await interaction.response.send_message("That run is too old to re-run; use /code again.", ephemeral=True)
            return
        new_id, mine = uuid.uuid4().hex, str(interaction.user.id) == old.user
        # Someone else's (a moderator's) re-run never fetches the requester's files again.
        job = self._job(new_id, str(interaction.id), old.conversation, interaction.user.id, old.text,
                        old.attachments if mine else [], old.kind)
        problem = (self._place_refusal(old.conversation) or self._not_owner(interaction, old, "re-run")
                   or await self._rerun_problem(interaction, old, job))
        problem = problem or await self._reserve(interaction.user.id, new_id)
        admitted = None
        if not problem and job.kind == "message":
            try:
                admitted = await self._admit(new_id, interaction.user.id, int(old.conversation.workspace),
                                             int(old.conversation.channel))
            except _Refusal as refusal:  # (_admit released the reservation)
                problem = refusal.refusal.user_message()
        if problem:
            await interaction.response.send_message(problem, ephemeral=True)
            return
        await interaction.response.defer()  # a silent ack: the button's message stays as it is
        try:
            if len(job.attachments) < len(old.attachments):
                await interaction.followup.send("Re-running the text only: the files of the original request "
                                                "are not fetched again for someone else.", ephemeral=True)
            await self._start(job, self._thread_of(old.conversation))
        except Exception as exc:
            await self.store.release(str(interaction.user.id), new_id)
            if admitted is not None:
                await self.queue.release_admission(admitted)
            log.exception("re-run failed to start")
            await interaction.followup.send(f"⚠️ Could not re-run: {_start_failure(exc)}", ephemeral=True)

    async def export(self, interaction: discord.Interaction[Any], job_id: str) -> None:
        """Anyone the allowlists admit may export: the notebook holds what the thread shows already.
        An ``export`` job: the worker builds the .ipynb from its record and the reply attaches it."""
        old = await self.store.job(job_id)
        if old is None:
            await interaction.response.send_message("That run is too old; type a request in the thread first.",
                                                    ephemeral=True)
            return
        new_id = uuid.uuid4().hex
        job = self._job(new_id, str(interaction.id), old.conversation, interaction.user.id, "", [], "export")
        problem = self._place_refusal(old.conversation) or await self._reserve(interaction.user.id, new_id)
        if problem:
            await interaction.response.send_message(problem, ephemeral=True)
            return
        await interaction.response.defer()
        try:
            await self._start(job, self._thread_of(old.conversation))
        except Exception as exc:
            await self.store.release(str(interaction.user.id), new_id)
            log.exception("export failed to start")
            await interaction.followup.send(f"⚠️ Could not export: {_start_failure(exc)}", ephemeral=True)

    async def _rerun_problem(self, interaction: discord.Interaction[Any], old: Job, job: Job) -> str | None:
        if job.kind == "reset":
            return await self.ownership.check_reset(job, known(interaction.permissions.manage_messages), fmt.mention)
        if job.kind == "message" and not await self.channels.enabled("discord", old.conversation.channel):
            return CHANNEL_DISABLED
        if old.attachments and not job.attachments and not old.text.strip():
            return (f"That request was only files, which stay private to {fmt.mention(old.user)}; "
                    "only they can re-run it.")
        return None

    # --- who may --------------------------------------------------------------------------------
    def _place_refusal(self, conv: Conversation) -> str | None:
        """The allowlists, for a button pressed on one of the conversation's messages."""
        return self.refusal(int(conv.workspace), int(conv.channel), int(conv.thread))

    @staticmethod
    def _not_owner(interaction: discord.Interaction[Any], job: Job, action: Literal["stop", "re-run"]) -> str | None:
        if str(interaction.user.id) == job.user or interaction.permissions.manage_messages:
            return None
        return not_yours(action, [job.user], fmt.mention)

    async def _typed_stop(self, message: discord.Message, conversation: Conversation) -> None:
        """``stop`` typed in the thread: the author's own jobs there (a moderator's: all of them)."""
        plan = await self.ownership.plan_stop(conversation, str(message.author.id),
                                              known(_manages_messages(message)), fmt.mention)
        if plan.refusal:
            await message.reply(plan.refusal)
            return
        for target in plan.targets:
            await self._stop(conversation, f"{message.id}:{target}", message.author.id, {}, target=target)
        await message.reply("⏹ Stopping." if len(plan.targets) == 1 else f"⏹ Stopping {len(plan.targets)} runs.")

    # --- jobs ----------------------------------------------------------------------------------
    def _job(self, job_id: str, idem: str, conversation: Conversation, user_id: int, text: str,
             attachments: list[Attachment], kind: JobKind = "message") -> Job:
        meta = {"thread_id": conversation.thread, "guild_id": conversation.workspace, "user_id": str(user_id)}
        return Job(id=job_id, idempotency_key=idem, conversation=conversation, user=str(user_id), text=text,
                   attachments=attachments, kind=kind, reply_stream=self.reply_stream, meta=meta)

    async def _start(self, job: Job, channel: Messageable, reference: discord.Message | None = None) -> None:
        """Post the job's status message (with Stop), then enqueue the job pointing at it."""
        line, view = fmt.status_line("queued"), running_view(job.id)
        if reference is None:
            status = await channel.send(line, view=view)
        else:
            ref = reference.to_reference(fail_if_not_exists=False)
            status = await channel.send(line, view=view, reference=ref)
        job.meta["status_message_id"] = str(status.id)
        await self.store.save_job(job)
        result = await self.queue.enqueue(job, admitted=True)  # message jobs passed ``admit`` already
        if not result.created:  # Discord redelivered an event we already have a job for
            await self.store.release(job.user, job.id)
            await self.queue.release_admission(job)
            await status.delete()
        elif job.kind == "message":
            await self.ownership.started(job)  # typed stop finds it; the first request owns the thread

    async def _stop(self, conversation: Conversation, idem: str, user_id: int, meta: dict[str, Any],
                    target: str) -> None:
        await self.queue.enqueue(Job(idempotency_key=idem, conversation=conversation, user=str(user_id),
                                     kind="stop", target=target, reply_stream=self.reply_stream, meta=dict(meta)))
