"""Events → Slack messages. One small actor (task + inbox) per running job.

``ReplyReader`` hands events over one at a time for every job; a slow Slack call (a 429 that
sleeps for Retry-After) must not hold up other threads, so ``handle`` only drops the event into
the job's inbox. The job's actor applies events in order and flushes the text at most once per
``edit_interval`` (Slack allows about one edit per second per message), immediately before an
upload and at the end.

Each job shows: a status message (posted right after enqueue, with a Stop button; it ends as the
final status line), the streamed reply below it, uploads in between, and a reaction on the
user's message (white_check_mark / x).

With several adapter replicas (``bot.queue.render_lease``) a job is rendered by the replica holding
its lease. After each flush the view's state (message ids, transcript, last seq shown) is committed
to Redis with the events it shows, so a replica that takes the job over (its owner died, or
stepped down on SIGTERM) edits the same status message and the same reply messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiohttp import ClientError
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.ownership import Ownership
from bot.adapters.slack.inbound import STOP_ACTION, Where, stop_value, where_from_meta
from bot.adapters.slack.transcript import Attach, Transcript, escape
from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue.blobs import BlobStore, missing_note
from bot.queue.render_lease import TOMBSTONE, RenderLeases

log = logging.getLogger(__name__)
SLACK_ERRORS = (SlackApiError, SlackRequestError, ClientError, asyncio.TimeoutError)


@dataclass
class View:
    job_id: str
    where: Where
    conversation: Conversation
    #: who asked (the Stop button names them, so a press by anyone else can be refused)
    user: str
    transcript: Transcript = field(default_factory=Transcript)
    inbox: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    status_ts: str | None = None
    status_shown: str = ""
    dirty: bool = False
    last_flush: float = 0.0
    task: asyncio.Task[None] | None = None
    #: leased rendering: the highest seq shown, and the job-stream entries applied since the last commit
    seq: int = 0
    applied: list[str] = field(default_factory=list)

    def dump(self) -> str:
        return json.dumps({"seq": self.seq, "status_ts": self.status_ts, "status_shown": self.status_shown,
                           "transcript": self.transcript.dump()})

    def restore(self, raw: bytes | str) -> None:
        data = json.loads(raw)
        self.seq = int(data.get("seq") or 0)
        self.status_ts = data.get("status_ts") or self.status_ts
        self.status_shown = str(data.get("status_shown") or "")
        self.transcript = Transcript.load(data.get("transcript") or {})
        self.dirty = True  # text applied before the last owner could show it goes out at the next flush


class _Lost(Exception):
    """The job's lease is another replica's now (this one stalled past it): stop rendering it."""


#: leased: 0.2 s waits at a job's end for a status message another replica is posting
STATUS_WAIT_TRIES = 10


#: put in a view's inbox on SIGTERM: flush, commit and hand the job to another replica
_STEP_DOWN = object()
Item = Job | Event | tuple[Event, str] | object


def status_blocks(text: str, view: View | None) -> list[dict[str, Any]]:
    """The status message; with a Stop button for ``view``'s job while it runs."""
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if view is not None:
        blocks.append({"type": "actions", "elements": [{
            "type": "button", "action_id": STOP_ACTION, "style": "danger",
            "text": {"type": "plain_text", "text": "Stop"},
            "value": stop_value(view.job_id, view.user, view.conversation)}]})
    return blocks


class SlackRenderer:
    def __init__(self, client: AsyncWebClient, redis: aioredis.Redis[Any], settings: Settings, *,
                 edit_interval: float = 1.0, idle_timeout: float = 3600.0, api_concurrency: int = 8,
                 ownership: Ownership | None = None, leases: RenderLeases | None = None,
                 before_call: Callable[[], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.redis = redis
        self.settings = settings
        #: told when a job ends, so typed ``stop`` no longer finds it
        self.ownership = ownership or Ownership(redis, settings)
        self.edit_interval = edit_interval
        self.idle_timeout = idle_timeout
        self.views: dict[str, View] = {}
        self.blobs = BlobStore(redis, settings)
        # Slack would rate-limit a burst anyway; a few calls in flight keep a burst of renders from
        # crowding out the acks that share this event loop.
        self._in_flight = asyncio.Semaphore(api_concurrency)
        #: several replicas: jobs are rendered under a lease, their state committed to Redis
        self.leases = leases
        if leases is not None:
            leases.on_lost = self._lost
        #: awaited before each Web API call: the adapter's acks in flight go first (slack/acks.py)
        self._before_call = before_call

    # --- entry points -----------------------------------------------------------------------------
    def start_job(self, job: Job, where: Where) -> None:
        """Post the status message (with Stop) for a job just enqueued; events queue up behind it."""
        self._view(job.id, where, job.conversation, job.user).inbox.put_nowait(job)

    async def handle(self, event: Event) -> None:
        """ReplyReader handler: never blocks on Slack."""
        view = self._view(event.job_id, where_from_meta(event.meta, event.conversation), event.conversation,
                          str(event.meta.get("user") or ""))
        view.inbox.put_nowait(event)

    async def deliver(self, event: Event, entry_id: str) -> None:
        """LeasedReader handler: an event of a job this replica holds, and its entry in the job's stream."""
        view = self._view(event.job_id, where_from_meta(event.meta, event.conversation), event.conversation,
                          str(event.meta.get("user") or ""))
        view.inbox.put_nowait((event, entry_id))

    async def drain(self, timeout: float = 20.0) -> None:
        """On SIGTERM, after the reader stopped: each job applies what it was handed, flushes,
        commits and steps down, so another replica carries it on at once."""
        if self.leases is None:
            return
        leases = self.leases
        for view in list(self.views.values()):
            view.inbox.put_nowait(_STEP_DOWN)
        tasks = [v.task for v in self.views.values() if v.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for job in list(leases.held):  # held, but none of its events came yet
            if job not in self.views:
                await leases.step_down(job)

    def _lost(self, job_id: str) -> None:
        view = self.views.get(job_id)
        if view is not None and view.task is not None:
            view.task.cancel()

    async def notify(self, where: Where, user: str, texts: list[str], *, markup: bool = False) -> None:
        """Tell ``user`` only (chat.postEphemeral). Texts are plain and escaped here, so a file
        name like ``<!channel>`` or ``<https://x|y>`` shows as typed and never pings or links;
        ``markup=True`` is for texts built from our own words and ids (a ``<@U…>`` mention)."""
        for text in texts:
            await self._call("chat_postEphemeral", channel=where.channel, user=user,
                             text=text if markup else escape(text), thread_ts=where.thread_ts)

    async def close(self) -> None:
        tasks = [v.task for v in self.views.values() if v.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the per-job actor --------------------------------------------------------------------------
    def _view(self, job_id: str, where: Where, conversation: Conversation, user: str) -> View:
        view = self.views.get(job_id)
        if view is None:
            view = self.views[job_id] = View(job_id, where, conversation, user)
            view.task = asyncio.create_task(self._run(view), name=f"slack-render-{job_id}")
        return view

    async def _run(self, view: View) -> None:
        try:
            started = False
            while True:
                wait = self.idle_timeout
                if view.dirty:
                    wait = max(0.0, view.last_flush + self.edit_interval - time.monotonic())
                try:
                    item = await asyncio.wait_for(view.inbox.get(), wait)
                except TimeoutError:
                    if not view.dirty:
                        log.warning("job %s went quiet without a final event; dropping its view", view.job_id)
                        return
                    await self._flush(view)
                    continue
                if isinstance(item, Job):
                    owned = self.leases is None or await self.leases.own(view.job_id)
                    if view.status_ts is None:
                        await self._post_status(view)
                    if not owned:
                        return  # another replica renders this job; it finds the status message
                    started = True
                    continue
                if item is _STEP_DOWN:
                    await self._step_down(view)
                    return
                if not started:
                    started = True
                    if not await self._restore(view):
                        return
                event, entry = item if isinstance(item, tuple) else (item, None)
                assert isinstance(event, Event)
                if entry is not None:
                    view.applied.append(entry)
                    if not event.terminal:
                        if event.seq <= view.seq:
                            continue  # shown already (by an earlier owner), or a re-run's duplicate
                        view.seq = event.seq
                if await self._apply(view, event):
                    return
        except _Lost:
            log.warning("job %s is rendered by another replica now; this one stops", view.job_id)
        except asyncio.CancelledError:
            if self.leases is not None and view.job_id not in self.leases.held:
                return  # our lease went to another replica (told by its tick): stop quietly
            raise
        except Exception:
            log.exception("rendering job %s failed", view.job_id)
        finally:
            self.views.pop(view.job_id, None)

    async def _restore(self, view: View) -> bool:
        """The job's first event here: its state from Redis (leased), or at least its status message.
        False when the job is over already (its tombstone): the rest is dropped."""
        if self.leases is None:
            view.status_ts = await self._stored_status(view.job_id)
            return True
        state, status = await self.redis.mget(self.leases.state_key(view.job_id), self._status_key(view.job_id))
        if state == TOMBSTONE:
            await self.leases.finish(view.job_id)
            return False
        if state:
            view.restore(state)
        if view.status_ts is None and status:
            view.status_ts = status.decode() if isinstance(status, bytes) else str(status)
        return True

    async def _commit(self, view: View) -> bool:
        """Leased: store what the job's messages show now, with the entries that made it."""
        if self.leases is None:
            return True
        applied, view.applied = view.applied, []
        if await self.leases.commit(view.job_id, applied, view.dump()):
            return True
        raise _Lost(view.job_id)

    async def _step_down(self, view: View) -> None:
        assert self.leases is not None
        if view.dirty:
            await self._flush(view)
        elif view.applied:
            await self._commit(view)
        await self.leases.step_down(view.job_id)

    async def _apply(self, view: View, event: Event) -> bool:
        """Fold one event in; True when the job is over."""
        attach = view.transcript.apply(event)
        view.dirty = True
        if attach is not None:
            await self._flush(view)
            await self._upload(view, attach)
            view.transcript.seal()
            await self._commit(view)  # a takeover must not upload it again
        if event.terminal:
            await self._flush(view, commit=False)
            await self._finish(view, event)
            return True
        if time.monotonic() - view.last_flush >= self.edit_interval:
            await self._flush(view)
        return False

    # --- Slack calls --------------------------------------------------------------------------------
    async def _call(self, method: str, **kwargs: Any) -> dict[str, Any] | None:
        """One Web API call; failures are logged, never raised, so one bad call can't end a reply.
        (429s never get here: the client's RateLimitErrorRetryHandler waits and retries them.)"""
        try:
            async with self._in_flight:
                if self._before_call is not None:
                    await self._before_call()
                response = await getattr(self.client, method)(**kwargs)
        except SLACK_ERRORS as exc:
            log.warning("slack %s failed: %s", method, exc)
            return None
        return dict(response.data) if isinstance(response.data, dict) else {}

    async def _post_status(self, view: View) -> None:
        text = ":hourglass_flowing_sand: Working on it…"
        resp = await self._call("chat_postMessage", channel=view.where.channel,
                                thread_ts=view.where.thread_ts, text=text,
                                blocks=status_blocks(text, view))
        if resp and resp.get("ts"):
            view.status_ts, view.status_shown = str(resp["ts"]), text
            # Another adapter replica (or this one after a restart) may render the rest of the job.
            await self.redis.set(self._status_key(view.job_id), view.status_ts,
                                 ex=self.settings.idempotency_ttl_s)

    async def _stored_status(self, job_id: str) -> str | None:
        raw = await self.redis.get(self._status_key(job_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    def _status_key(self, job_id: str) -> str:
        return self.settings.key("slack", "status", job_id)

    async def _flush(self, view: View, commit: bool = True) -> None:
        if view.status_ts is None and self.leases is not None:
            # the replica that took the mention posts the status message; it may be posting now
            view.status_ts = await self._stored_status(view.job_id)
        view.dirty = False
        view.last_flush = time.monotonic()
        channel, thread = view.where.channel, view.where.thread_ts
        for section in view.transcript.sections:
            chunks = section.chunks()
            for i, chunk in enumerate(chunks):
                if i < len(section.sent):
                    ts, shown = section.sent[i]
                    if shown != chunk and await self._call("chat_update", channel=channel, ts=ts, text=chunk):
                        section.sent[i] = (ts, chunk)
                    continue
                resp = await self._call("chat_postMessage", channel=channel, thread_ts=thread, text=chunk,
                                        unfurl_links=False, unfurl_media=False)
                if not resp or "ts" not in resp:
                    break  # try again at the next flush rather than posting out of order
                section.sent.append((str(resp["ts"]), chunk))
            for ts, _ in section.sent[len(chunks):]:
                await self._call("chat_delete", channel=channel, ts=ts)
            del section.sent[len(chunks):]
        status = view.transcript.status
        if status and view.status_ts and status != view.status_shown:
            text = f":hourglass_flowing_sand: {escape(status)}"
            if await self._call("chat_update", channel=channel, ts=view.status_ts, text=text,
                                blocks=status_blocks(text, view)):
                view.status_shown = status
        if commit:
            await self._commit(view)

    async def _upload(self, view: View, attach: Attach) -> None:
        data = attach.data
        if attach.blob is not None:
            # taken (fetched and deleted) now: the reader renders an event once, so nobody needs it later
            found = await self.blobs.take(attach.blob)
            if found is None:
                view.transcript.note(missing_note({"name": attach.name}))
                return
            data = found
        await self._call("files_upload_v2", channel=view.where.channel, thread_ts=view.where.thread_ts,
                         file=data, filename=attach.name, title=attach.name,
                         initial_comment=attach.comment)

    async def _finish(self, view: View, event: Event) -> None:
        p = event.payload
        for _ in range(STATUS_WAIT_TRIES if self.leases is not None and view.status_ts is None else 0):
            # Another replica took the mention and is posting the status message: a job quicker than
            # that post must still end it with the final line, not leave "Working on it…" behind.
            await asyncio.sleep(0.2)
            if (status := await self._stored_status(view.job_id)) is not None:
                view.status_ts = status
                break
        if event.type == "error":
            line, reaction = f":x: {escape(str(p.get('message') or 'Failed.'))}", "x"
        elif p.get("cancelled"):
            line, reaction = ":black_square_for_stop: Stopped.", "black_square_for_stop"
        elif p.get("ok", True):
            rounds = p.get("rounds")
            line = ":white_check_mark: Done" + (f" ({rounds} round{'s' if rounds != 1 else ''})"
                                                if isinstance(rounds, int) else "")
            reaction = "white_check_mark"
        else:
            line, reaction = ":x: Finished, but the code still fails.", "x"
        if p.get("setup") and event.type == "final":
            line += f" · {escape(str(p['setup']))}"
        if view.status_ts:
            await self._call("chat_update", channel=view.where.channel, ts=view.status_ts, text=line,
                             blocks=status_blocks(line, None))
        if view.where.message_ts:
            await self._call("reactions_add", channel=view.where.channel, timestamp=view.where.message_ts,
                             name=reaction)
        await self.ownership.ended(view.conversation, view.job_id)
        if self.leases is not None:
            await self.leases.finish(view.job_id)
