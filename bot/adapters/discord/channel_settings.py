"""``/codeloop-config``: a channel's settings, shown and changed by server admins
(bot/adapters/channel_command.py does the work; this is Discord's shape of it).

Admins are members with **Manage Server** in the channel: the command is registered with
``default_member_permissions`` = Manage Server, so Discord does not offer it to anyone else, and
the permission is checked again here from the interaction (server owners can grant the command
to others in Server Settings → Integrations; those still need Manage Server for it to act). Used
inside a thread, it sets up the thread's channel, where ``/code`` threads take their settings from.
Every answer is ephemeral.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import discord
from discord import app_commands

from bot.adapters import channel_command
from bot.adapters.channel_command import Command
from bot.adapters.discord import format as fmt
from bot.queue.channel_config import ChannelConfigs

log = logging.getLogger(__name__)
NAME = "codeloop-config"
NOT_ADMIN = "Only members with the Manage Server permission can see or change codeloop's settings for a channel."


class ChannelSettings:
    def __init__(self, configs: ChannelConfigs, refusal: Any) -> None:
        self.configs = configs
        #: ``Intake.refusal``: the operator's guild and channel allowlists
        self.refusal = refusal

    async def handle(self, interaction: discord.Interaction[Any], command: Command) -> None:
        channel = interaction.channel
        parent = channel.parent_id if isinstance(channel, discord.Thread) else None
        where = parent or interaction.channel_id
        problem = self.refusal(interaction.guild_id, interaction.channel_id, parent)
        if problem is None and not interaction.permissions.manage_guild:
            problem = NOT_ADMIN
        if problem is not None or where is None:
            await interaction.response.send_message(problem or NOT_ADMIN, ephemeral=True)
            return
        answer = await channel_command.run(command, self.configs, "discord", str(where), str(interaction.user.id),
                                           name=f"/{NAME}", escape=fmt.inert, mention=fmt.mention)
        log.info("discord /%s %s in %s by %s", NAME, command.action, where, interaction.user.id)
        await interaction.response.send_message(answer[:fmt.MESSAGE_LIMIT], ephemeral=True)


def config_group(handler: ChannelSettings) -> app_commands.Group:
    group = app_commands.Group(name=NAME, description="codeloop's settings for this channel (admins)",
                               allowed_contexts=app_commands.AppCommandContext(guild=True),
                               default_permissions=discord.Permissions(manage_guild=True))

    @group.command(name="show", description="Show this channel's settings")
    async def show(interaction: discord.Interaction[Any]) -> None:
        await handler.handle(interaction, Command("show"))

    @group.command(name="set", description="Change one setting for this channel")
    @app_commands.describe(setting="rounds: fix-up rounds · prompt: an extra instruction · profile: the model",
                           value="rounds: a number; prompt: one line (empty removes it); profile: a name or default")
    async def set_(interaction: discord.Interaction[Any], setting: Literal["rounds", "prompt", "profile"],
                   value: str = "") -> None:
        await handler.handle(interaction, Command("set", setting, value))

    @group.command(name="enable", description="Take requests in this channel")
    async def enable(interaction: discord.Interaction[Any]) -> None:
        await handler.handle(interaction, Command("enable"))

    @group.command(name="disable", description="Turn requests in this channel away")
    async def disable(interaction: discord.Interaction[Any]) -> None:
        await handler.handle(interaction, Command("disable"))

    @group.command(name="reset", description="Back to the defaults in this channel")
    async def reset(interaction: discord.Interaction[Any]) -> None:
        await handler.handle(interaction, Command("reset"))

    return group
