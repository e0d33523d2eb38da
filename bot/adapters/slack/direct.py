"""HTTP mode's fast path: a signed ``app_mention`` or ``message`` event goes straight to the adapter.

Measured with ``codeloop bench ack`` (in-process, 100 events at once), bolt's request pipeline
(request object, middleware chain, context, listener matching, argument injection, response
object) cost about as much CPU per event as all of our own work before the ack, enqueue included;
under a burst every ack waits for the CPU of the whole burst, so that cost lands on p99.

Only what bolt would do for these deliveries is done here, and nothing is checked less:
* the signature and timestamp, with slack_sdk's ``SignatureVerifier`` (what bolt's request
  verification middleware uses); a request that fails it is not handled here at all: bolt answers
  it (401), as everything that is not a signed event callback of these two types (the URL
  challenge, interactions, other events);
* the bot's identity (team and bot user), from one ``auth.test`` kept for the process, as bolt's
  single-team authorization keeps it; if that call fails, bolt takes the request;
* events from ourselves are dropped by ``handle_event`` (``is_from_person``), as bolt's
  ignoring-self-events middleware would;
* the answer: 200 once the handler returned (the job is on the queue: the at-least-once contract
  in docs/SLACK.md), 500 if it raised, so Slack delivers the event again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.slack.render import SLACK_ERRORS

log = logging.getLogger(__name__)

EVENT_TYPES = ("app_mention", "message")
Handler = Callable[[dict[str, Any], dict[str, Any], str | None, str | None], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    body: dict[str, Any]
    event: dict[str, Any]
    team_id: str | None
    bot_user_id: str | None


class DirectEvents:
    def __init__(self, signing_secret: str, client: AsyncWebClient) -> None:
        self.verifier = SignatureVerifier(signing_secret)
        self.client = client
        self._me: tuple[str | None, str | None] | None = None
        self._me_lock = asyncio.Lock()

    async def take(self, request: web.Request, body: str) -> Delivery | None:
        """The delivery, when this request is ours to handle here; None: bolt's."""
        if request.content_type != "application/json":
            return None
        timestamp = request.headers.get("X-Slack-Request-Timestamp")
        signature = request.headers.get("X-Slack-Signature")
        if not timestamp or not timestamp.isdigit() or not signature:
            return None
        if not self.verifier.is_valid(body, timestamp, signature):
            return None
        try:
            payload = json.loads(body)
        except ValueError:
            return None
        event = payload.get("event") if isinstance(payload, dict) and payload.get("type") == "event_callback" else None
        if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
            return None
        me = await self._identity()
        if me is None:
            return None
        return Delivery(payload, event, *me)

    async def run(self, delivery: Delivery, handler: Handler) -> web.Response:
        try:
            await handler(delivery.body, delivery.event, delivery.team_id, delivery.bot_user_id)
        except Exception:
            log.exception("event %s failed; Slack will deliver it again", delivery.body.get("event_id"))
            return web.Response(status=500)
        return web.Response(status=200)

    async def _identity(self) -> tuple[str | None, str | None] | None:
        if self._me is None:
            async with self._me_lock:
                if self._me is None:
                    try:
                        me = await self.client.auth_test()
                    except SLACK_ERRORS as exc:
                        log.warning("auth.test failed (%s); bolt takes this event", exc)
                        return None
                    self._me = (me.get("team_id"), me.get("user_id"))
        return self._me
