"""The discord.py client: intents, the /code command, the buttons, and the reply-stream reader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import discord
import redis.asyncio as aioredis
from discord import app_commands
from discord.http import Route

from bot.adapters.discord.channel_settings import ChannelSettings, config_group
from bot.adapters.discord.intake import Intake
from bot.adapters.discord.render import EDIT_INTERVAL_S, Renderer
from bot.adapters.discord.store import DiscordStore
from bot.adapters.discord.views import ExportButton, RerunButton, StopButton
from bot.core.settings import Settings
from bot.queue.replies import ReplyReader
from bot.queue.stream import JobQueue

log = logging.getLogger(__name__)

# What the bot needs in a channel; the invite URL asks for exactly these.
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    attach_files=True,
    read_message_history=True,  # replying to a message references it
)
SCOPES = ("bot", "applications.commands")
DESCRIPTION = "Write and run Python with codeloop; it answers in a thread"


def intents() -> discord.Intents:
    """Guilds (thread and channel events) and guild messages with their content: the text of the
    follow-ups in our threads. Message content is privileged: enable it in the developer portal."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.message_content = True
    return wanted


def use_api_url(url: str) -> None:
    """Point all of discord.py's REST calls at ``url`` (Discord's own, a proxy, a test server).

    discord.py builds every REST URL (bot routes, webhooks and interaction callbacks alike) from
    the class attribute ``Route.BASE`` when a request's Route is made; its own API-version switch
    sets it the same way. It is process-wide, which matches one bot per process.
    """
    Route.BASE = url.rstrip("/")


def invite_url(application_id: int) -> str:
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS, scopes=SCOPES)


def code_command(intake: Intake) -> app_commands.Command[Any, Any, None]:
    @app_commands.command(name="code", description=DESCRIPTION)
    @app_commands.describe(prompt="What to do, e.g. 'load the CSV and plot revenue by month'",
                           file="A file to put in /mnt/data for the code to read")
    @app_commands.guild_only()
    async def code(interaction: discord.Interaction, prompt: str,
                   file: discord.Attachment | None = None) -> None:
        await intake.code(interaction, prompt, file)

    return code


class CodeloopBot(discord.Client):
    def __init__(self, settings: Settings, redis: aioredis.Redis[Any], *,
                 edit_interval_s: float = EDIT_INTERVAL_S) -> None:
        super().__init__(intents=intents(), allowed_mentions=discord.AllowedMentions.none())
        self.settings = settings
        self.redis = redis
        self.store = DiscordStore(redis, settings)
        self.controls = Intake(self, settings, JobQueue(redis, settings), self.store)  # views.HasControls
        self.renderer = Renderer(self, self.store, edit_interval_s)
        self.tree: app_commands.CommandTree[CodeloopBot] = app_commands.CommandTree(self)
        self.tree.add_command(code_command(self.controls))
        self.tree.add_command(config_group(ChannelSettings(self.controls.channels, self.controls.refusal)))
        self._stopping = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def login(self, token: str) -> None:
        use_api_url(self.settings.discord_api_url)
        await super().login(token)

    async def setup_hook(self) -> None:
        # Buttons are matched by custom_id template, so those on old messages work after a restart.
        self.add_dynamic_items(StopButton, RerunButton, ExportButton)

    async def start(self, token: str, *, reconnect: bool = True) -> None:
        await self.login(token)
        self.start_replies()
        await self.connect(reconnect=reconnect)

    def start_replies(self) -> None:
        """Render the workers' events (our reply stream) until the client closes."""
        if self._reader is None:
            reader = ReplyReader(self.redis, self.settings, "discord")
            self._reader = asyncio.create_task(reader.run(self.renderer.handle, self._stopping))

    async def close(self) -> None:
        self._stopping.set()
        if self._reader is not None:
            # The reader notices the stop flag after its current blocking read (about a second).
            try:
                await asyncio.wait_for(self._reader, timeout=5)
            except TimeoutError:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
        await super().close()

    async def on_message(self, message: discord.Message) -> None:
        await self.controls.on_message(message)
