"""The bolt app: Slack requests in, Jobs onto the queue, an ack back — nothing slower.

``process_before_response=True`` makes bolt ack only after a listener returns, and a listener
returns right after the job is on the Redis stream: an acked event is never lost, and a failure
to enqueue leaves Slack to retry. Everything that talks to Slack (status message, notices) runs in
background tasks after the ack. Retries carry the same ``event_id``, which the queue deduplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.ownership import Ownership
from bot.adapters.slack.acks import AckFirst
from bot.adapters.slack.channel_settings import COMMAND, ChannelSettingsCommand
from bot.adapters.slack.context import thread_context
from bot.adapters.slack.controls import SlackControls
from bot.adapters.slack.direct import DirectEvents
from bot.adapters.slack.inbound import (
    EXPORT_SHORTCUT,
    RESET_SHORTCUT,
    STOP_ACTION,
    Inbound,
    Where,
    is_dm,
    is_from_person,
    translate,
)
from bot.adapters.slack.render import SlackRenderer
from bot.core.jobs import Job
from bot.core.settings import Settings
from bot.queue.channel_config import CHANNEL_DISABLED, ChannelConfigs
from bot.queue.redis_conn import claim_once
from bot.queue.render_lease import RenderLeases
from bot.queue.replies import reply_stream
from bot.queue.stream import EnqueueResult, JobQueue

log = logging.getLogger(__name__)
EVENTS_PATH = "/slack/events"


def make_client(settings: Settings, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """The Web API client: base URL from settings; 429s wait for Retry-After, blips are retried.
    Pass ``session`` to reuse connections: without one, slack_sdk opens a session (and a TCP and
    TLS connection to Slack) for every call."""
    settings.require("slack_bot_token")
    assert settings.slack_bot_token is not None
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        session=session,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncRateLimitErrorRetryHandler(max_retry_count=5),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ],
    )


class SlackAdapter:
    def __init__(self, settings: Settings, redis: aioredis.Redis[Any], client: AsyncWebClient | None = None,
                 *, edit_interval: float = 1.0, leases: RenderLeases | None = None) -> None:
        self.settings = settings
        self.redis = redis
        #: the Web API's connections, kept alive across calls (ours to close when we made it)
        self._http: aiohttp.ClientSession | None = None
        if client is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            client = make_client(settings, self._http)
        self.client = client
        self.queue = JobQueue(redis, settings)
        self.reply_stream = reply_stream(settings, "slack")
        self.ownership = Ownership(redis, settings)
        #: post-ack work (Slack calls, records) lets the acks of a burst go first
        self.acks = AckFirst()
        self.renderer = SlackRenderer(self.client, redis, settings, edit_interval=edit_interval,
                                      ownership=self.ownership, leases=leases, before_call=self.acks.quiet)
        self.controls = SlackControls(settings, self.client, self.ownership, self.reply_stream, self._submit,
                                      self._tell)
        self.channels = ChannelConfigs(redis, settings)
        self.channel_settings = ChannelSettingsCommand(settings, self.channels, self.controls.moderators, self._http)
        secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
        #: HTTP mode: signed events skip bolt's request pipeline (slack/direct.py)
        self.direct = DirectEvents(secret, self.client) if secret and settings.slack_mode == "http" else None
        self.app = AsyncApp(
            client=self.client,
            signing_secret=secret,
            # Socket Mode messages are authenticated by the app-level token, not signed.
            request_verification_enabled=settings.slack_mode == "http",
            process_before_response=True,
            name="codeloop",
        )
        self.app.event("app_mention")(self.on_event)
        self.app.event("message")(self.on_event)
        self.app.action(STOP_ACTION)(self.on_stop)
        self.app.shortcut(RESET_SHORTCUT)(self.on_reset)
        self.app.shortcut(EXPORT_SHORTCUT)(self.on_export)
        self.app.command(COMMAND)(self.on_command)
        self._background: set[asyncio.Task[Any]] = set()
        self._records: list[tuple[Job, str | None]] = []

    # --- listeners (all return within a Redis round trip or two) ----------------------------------
    async def on_event(self, body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
        await self.handle_event(body, event, context.team_id, context.bot_user_id)

    async def handle_event(self, body: dict[str, Any], event: dict[str, Any], team_id: str | None,
                           bot_user_id: str | None) -> None:
        """An ``app_mention`` or ``message`` event, from bolt (Socket Mode) or ``DirectEvents``."""
        if not is_from_person(event, bot_user_id):
            return  # our own messages (status, replies) and other apps': nothing to look up
        team = str(body.get("team_id") or team_id or "")
        event_id = str(body.get("event_id") or f"{event.get('channel')}:{event.get('ts')}")
        joined = False
        if event.get("type") == "message" and event.get("thread_ts") and not is_dm(event):
            thread_key = self._thread_key(team, event["channel"], event["thread_ts"])
            joined = bool(await self.redis.exists(thread_key))
        inbound = translate(event, event_id=event_id, team_id=team, bot_user_id=bot_user_id,
                            settings=self.settings, reply_stream=self.reply_stream, joined=joined)
        if inbound is None:
            return
        if inbound.job is not None and inbound.job.kind != "message":
            # stop / reset: checked for ownership (a retried delivery must not be charged twice)
            if await claim_once(self.redis, self.settings.key("slack", "control", event_id),
                                self.settings.idempotency_ttl_s):
                await self.controls.typed(inbound, event_id)
            return
        if inbound.job is not None and not is_dm(event) and not await self.channels.enabled("slack",
                                                                                             inbound.where.channel):
            # turned off by the channel's admins (/codeloop disable): no job, one ephemeral line
            inbound.job, inbound.notices = None, [CHANNEL_DISABLED]
        if (inbound.job is not None and event.get("type") == "app_mention" and not is_dm(event)
                and inbound.where.thread_ts not in (None, inbound.where.message_ts)):
            inbound.job = await self._with_thread_context(inbound.job, team, inbound.where, bot_user_id)
        result = await self._submit(inbound.job) if inbound.job is not None else None
        if result is not None and result.refused is not None:
            # Over a limit: no status message, no job. One ephemeral "slow down" per window.
            if result.refused.notify:
                self.spawn(self.renderer.notify(inbound.where, inbound.user, [result.refused.user_message()]))
            return
        if inbound.job is not None and result is not None and result.created:
            job = inbound.job.model_copy(update={"id": result.job_id})
            thread = None
            if inbound.where.thread_ts is not None and not is_dm(event):
                thread = self._thread_key(team, inbound.where.channel, inbound.where.thread_ts)
            # After the ack (a person takes seconds to reply; the ack path stays one round trip)
            self._record_soon(job, thread)
            self.renderer.start_job(job, inbound.where)
        await self._notices(inbound, event_id, result)

    async def _with_thread_context(self, job: Job, team: str, where: Where, bot_user_id: str | None) -> Job:
        """A first mention inside an existing thread: the job carries the thread's earlier
        messages for the model. A thread we already answer in has them in its history."""
        assert where.thread_ts is not None
        if await self.redis.exists(self._thread_key(team, where.channel, where.thread_ts)):
            return job
        text = await thread_context(self.client, where.channel, where.thread_ts, where.message_ts, bot_user_id,
                                    max_messages=self.settings.thread_context_messages,
                                    max_chars=self.settings.thread_context_chars)
        return job.model_copy(update={"context": text}) if text else job

    def _record_soon(self, job: Job, thread_key: str | None) -> None:
        """After the acks: follow-ups in this thread now reach us without a mention; typed stop
        finds the job; a conversation's first request makes its owner. The records of a burst
        share one round trip."""
        if not self._records:
            self.spawn(self._record())
        self._records.append((job, thread_key))

    async def _record(self) -> None:
        batch, self._records = self._records, []  # (spawn waited for the acks: the burst is in)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job, thread_key in batch:
                if thread_key is not None:
                    pipe.set(thread_key, 1, ex=self.settings.conversation_ttl_s)
                self.ownership.record(pipe, job)
            await pipe.execute()

    async def on_stop(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self.controls.stop_button(body)
        await ack()

    async def on_reset(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self.controls.reset_shortcut(body)
        await ack()

    async def on_export(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self.controls.export_shortcut(body)
        await ack()

    async def on_command(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """``/codeloop``: acked at once; the answer follows through the response_url."""
        await ack()
        self.spawn(self.channel_settings.handle(body))

    # --- helpers --------------------------------------------------------------------------------------
    async def _submit(self, job: Job) -> EnqueueResult:
        # concurrent acks' enqueues share a round trip (JobQueue's scripts are auto-pipelined); the
        # user's limits are checked in that same script, before anything is posted
        result = await self.queue.enqueue(job, limits=True)
        log.info("slack %s job %s for %s (%s)", job.kind, result.job_id, job.conversation.key,
                 f"refused: {result.refused.kind}" if result.refused else "new" if result.created else "duplicate")
        return result

    async def _notices(self, inbound: Inbound, event_id: str, result: EnqueueResult | None) -> None:
        if not inbound.notices or (result is not None and not result.created):
            return
        if result is None:
            # No job to deduplicate on: a retried delivery must not repeat the refusal.
            key = self.settings.key("slack", "notice", event_id)
            if not await claim_once(self.redis, key, self.settings.idempotency_ttl_s):
                return
        self._tell(inbound.where, inbound.user, inbound.notices)

    def _tell(self, where: Where, user: str, texts: list[str], markup: bool = False) -> None:
        """Ephemeral notices to ``user``, after the ack."""
        self.spawn(self.renderer.notify(where, user, texts, markup=markup))

    def _thread_key(self, team: str, channel: str, thread_ts: str) -> str:
        return self.settings.key("slack", "thread", team or "-", channel, thread_ts)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run after the acks in flight (``AckFirst``); keep a reference so the task is not
        garbage-collected mid-flight."""
        task = asyncio.create_task(self._after_acks(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_acks(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            await self.acks.quiet()
        except BaseException:
            coro.close()
            raise
        return await coro

    def web_app(self) -> web.Application:
        """The HTTP Events API endpoint (bolt verifies signatures: bad or stale → 401) + /healthz."""
        app = web.Application()
        app.router.add_post(EVENTS_PATH, self._events)
        app.router.add_get("/healthz", _healthz)
        return app

    async def _events(self, request: web.Request) -> web.Response:
        """Signed mentions and messages straight to ``handle_event`` (``DirectEvents``); the rest
        (challenge, interactions, anything unsigned or badly signed) through bolt, as its own
        aiohttp server does. Counted for ``AckFirst``."""
        with self.acks.answering():
            body = await request.text()
            delivery = await self.direct.take(request, body) if self.direct is not None else None
            if self.direct is not None and delivery is not None:
                return await self.direct.run(delivery, self.handle_event)
            response = await self.app.async_dispatch(await to_bolt_request(request))
            return await to_aiohttp_response(response)

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.renderer.close()
        if self._http is not None:
            await self._http.close()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")
