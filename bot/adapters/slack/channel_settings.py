"""``/codeloop``: a channel's settings, shown and changed by workspace admins (bot/adapters/channel_command.py).

The slash command is acked at once (empty body); the admin check (users.info, cached, bounded
at 2 s) and the Redis work run after the ack, and the answer goes to the ``response_url`` Slack
sent with the command, as an ephemeral message: it works in channels the bot has not joined,
where chat.postEphemeral would fail. Admins are the moderators of stop/reset (workspace admins
and owners, or CODELOOP_SLACK_MODERATORS); anyone else is told so, and nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.adapters import channel_command
from bot.adapters.slack.controls import Moderators, mention
from bot.adapters.slack.inbound import NOT_ALLOWED_USER, access_refusal
from bot.adapters.slack.render import SLACK_ERRORS
from bot.adapters.slack.transcript import escape
from bot.core.errors import InputRejected
from bot.core.settings import Settings
from bot.queue.channel_config import ChannelConfigs

log = logging.getLogger(__name__)
COMMAND = "/codeloop"
NOT_ADMIN = ("Only workspace admins and owners (or the bot's moderators) can see or change codeloop's "
             "settings for a channel.")
NOT_IN_DM = "Channel settings are for channels: run `/codeloop` in the channel you want to set up."


class ChannelSettingsCommand:
    def __init__(self, settings: Settings, configs: ChannelConfigs, moderators: Moderators,
                 http: aiohttp.ClientSession | None) -> None:
        self.settings = settings
        self.configs = configs
        self.moderators = moderators
        self.http = http

    async def answer_for(self, body: dict[str, Any]) -> str:
        """What the admin (or anyone else) is told; the change is made before it is said."""
        user, channel = str(body.get("user_id") or ""), str(body.get("channel_id") or "")
        if not channel or channel.startswith("D") or body.get("channel_name") == "directmessage":
            return NOT_IN_DM
        refusal = access_refusal(self.settings, channel, user)
        if refusal is not None and refusal != NOT_ALLOWED_USER:
            return refusal  # a channel the operator does not list: nothing to set up here
        if not await self.moderators.check(user):
            return NOT_ADMIN
        try:
            command = channel_command.parse(str(body.get("text") or ""))
        except InputRejected as exc:
            return escape(exc.user_message())
        answer = await channel_command.run(command, self.configs, "slack", channel, user, name=COMMAND,
                                           escape=escape, mention=mention)
        log.info("slack %s %s in %s by %s", COMMAND, command.action, channel, user)
        return answer

    async def handle(self, body: dict[str, Any]) -> None:
        """After the ack: decide, act, and answer through the command's response_url."""
        try:
            text = await self.answer_for(body)
        except Exception:
            log.exception("%s failed", COMMAND)
            text = "Something went wrong on our side; try again in a minute."
        url = str(body.get("response_url") or "")
        if not url:
            log.warning("%s without a response_url; the answer is not shown", COMMAND)
            return
        try:
            await AsyncWebhookClient(url, session=self.http).send(text=text, response_type="ephemeral")
        except SLACK_ERRORS as exc:
            log.warning("%s: could not answer through the response_url (%s)", COMMAND, exc)
