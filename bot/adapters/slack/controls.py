"""Stop, reset and export on Slack: the Stop button, the "reset session" and "Export notebook"
shortcuts, typed ``stop``/``reset``.

Each is allowed to the job's requester (a reset: the conversation's starter) or a moderator
(``bot.adapters.ownership``), obeys the same channel, DM and user allowlists as messages, and
answers anyone else with an ephemeral line. A Stop stops that one job, by id: pressing Stop on
your queued request never stops someone else's running one in the same thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.ownership import Ownership, not_yours
from bot.adapters.slack.inbound import (
    Inbound,
    Where,
    access_refusal,
    actor_of,
    reset_job,
    stop_press,
    where_of_action,
)
from bot.adapters.slack.render import SLACK_ERRORS
from bot.adapters.slack.transcript import escape
from bot.core.jobs import Conversation, Job
from bot.core.settings import Settings
from bot.queue.stream import EnqueueResult

log = logging.getLogger(__name__)
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")
OLD_BUTTON = "This Stop button is from an older version of codeloop; type `stop` in the thread instead."
#: how long a users.info answer is trusted, and how long one may take before the press is refused
MODERATOR_CACHE_S = 300.0
MODERATOR_TIMEOUT_S = 2.0

Submit = Callable[[Job], Awaitable[EnqueueResult]]
Tell = Callable[[Where, str, list[str], bool], None]


def mention(user: str) -> str:
    return f"<@{user}>" if _USER_ID.fullmatch(user) else escape(user)


class Moderators:
    """``CODELOOP_SLACK_MODERATORS``, and workspace admins and owners (users.info; needs the
    users:read scope — without it only the configured list counts, with a warning in the log)."""

    def __init__(self, client: AsyncWebClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._cache: dict[str, tuple[float, bool]] = {}

    async def check(self, user: str) -> bool:
        if user in self.settings.slack_moderators:
            return True
        hit = self._cache.get(user)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        try:
            async with asyncio.timeout(MODERATOR_TIMEOUT_S):
                resp = await self.client.users_info(user=user)
        except (*SLACK_ERRORS, TimeoutError) as exc:
            log.warning("users.info for %s failed (%s); not treated as a moderator", user, exc)
            return False
        info = resp.get("user") or {}
        allowed = bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[user] = (time.monotonic() + MODERATOR_CACHE_S, allowed)
        return allowed


class SlackControls:
    def __init__(self, settings: Settings, client: AsyncWebClient, ownership: Ownership, reply_stream: str,
                 submit: Submit, tell: Tell) -> None:
        self.settings = settings
        self.ownership = ownership
        self.moderators = Moderators(client, settings)
        self.reply_stream = reply_stream
        self.submit = submit
        self.tell = tell

    def _is_moderator(self, user: str) -> Callable[[], Awaitable[bool]]:
        return lambda: self.moderators.check(user)

    async def _stop(self, conversation: Conversation, target: str, actor: str, idem: str) -> None:
        await self.submit(Job(idempotency_key=idem, conversation=conversation, user=actor, kind="stop",
                              target=target, reply_stream=self.reply_stream, meta={"channel": conversation.channel}))

    # --- the Stop button -----------------------------------------------------------------------
    async def stop_button(self, body: dict[str, Any]) -> None:
        press = stop_press(body)
        if press is None:
            self.tell(where_of_action(body), actor_of(body), [OLD_BUTTON], False)
            return
        refusal = access_refusal(self.settings, press.conversation.channel, press.actor)
        if refusal is not None:
            self.tell(press.where, press.actor, [refusal], False)
            return
        if press.actor != press.requester and not await self.moderators.check(press.actor):
            self.tell(press.where, press.actor, [not_yours("stop", [press.requester], mention)], True)
            return
        action_ts = next((a.get("action_ts") for a in body.get("actions") or []), "") or time.time()
        await self._stop(press.conversation, press.job_id, press.actor, f"stop:{press.job_id}:{action_ts}")

    # --- reset: the message shortcut and the typed word ----------------------------------------
    async def reset_shortcut(self, body: dict[str, Any]) -> None:
        found = self._shortcut_job(body, "reset")
        if found is not None:
            await self._reset(*found)

    def _shortcut_job(self, body: dict[str, Any], kind: str) -> tuple[Job, Where] | None:
        """The job a message shortcut asks for, or None (told to the user) where the allowlists refuse."""
        found = reset_job(body, self.reply_stream, kind=kind)
        if found is None:
            return None
        job, where = found
        refusal = access_refusal(self.settings, where.channel, job.user)
        if refusal is not None:
            self.tell(where, job.user, [refusal], False)
            return None
        return found

    # --- export: the "Export notebook" message shortcut ------------------------------------------
    async def export_shortcut(self, body: dict[str, Any]) -> None:
        """Anyone the allowlists admit may export: the notebook holds what the thread shows already.
        The worker builds it from its own record and the file is posted into the thread."""
        found = self._shortcut_job(body, "export")
        if found is not None:
            await self.submit(found[0])

    async def _reset(self, job: Job, where: Where) -> None:
        refusal = await self.ownership.check_reset(job, self._is_moderator(job.user), mention)
        if refusal is not None:
            self.tell(where, job.user, [refusal], True)
            return
        await self.submit(job)

    # --- typed words (the allowlists were applied by ``translate``) -----------------------------
    async def typed(self, inbound: Inbound, event_id: str) -> None:
        job = inbound.job
        assert job is not None and job.kind in ("stop", "reset")
        if job.kind == "reset":
            await self._reset(job, inbound.where)
            return
        plan = await self.ownership.plan_stop(job.conversation, inbound.user, self._is_moderator(inbound.user),
                                              mention)
        if plan.refusal is not None:
            self.tell(inbound.where, inbound.user, [plan.refusal], True)
        for target in plan.targets:
            await self._stop(job.conversation, target, inbound.user, f"{event_id}:{target}")
