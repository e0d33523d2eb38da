"""Running one job: input checks, uploads, the agent turn, events, state — and every way it ends.

The worker begins a job with ``JobQueue.begin`` (its turn, the conversation lock, the saved state)
and every way a job ends goes through ``JobRun.finish``: the events still unsent, the terminal
event, the new state, the ack and the lock's release in one script. Images and files the code
makes go to blob keys before their events are published (``bot.queue.blobs``): events carry names.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from redis.exceptions import RedisError

from bot.agent.loop import Turn
from bot.agent.prompts import SYSTEM_PROMPT, THREAD_CONTEXT_ASK, THREAD_CONTEXT_INTRO, files_note
from bot.core.errors import CodeloopError, InputRejected, JobCancelled, Refused, ServiceBusy
from bot.core.jobs import Event, Job
from bot.core.limits import InputLimits, Upload, check_upload
from bot.core.notebook import NotebookRecorder
from bot.core.settings import Settings
from bot.llm.base import GenerationParams, ModelClient
from bot.llm.profiles import ModelProfiles
from bot.ops import metrics
from bot.queue import usage
from bot.queue.blobs import BlobStore, JobBlobs, MemoryGuard
from bot.queue.channel_config import ChannelConfigs
from bot.queue.outbox import Outbox
from bot.queue.ratelimit import RateLimiter
from bot.queue.stream import Delivery, JobQueue
from bot.worker import thread_notebook
from bot.worker.downloads import DownloadPolicy
from bot.worker.files_store import FilesStore
from bot.worker.job_settings import JobSettings, job_settings
from bot.worker.sandbox_link import ThreadSandbox
from bot.worker.store import ConversationState, ConversationStore, trim_history

if TYPE_CHECKING:
    from runner.engines import Sandboxes

log = logging.getLogger(__name__)


class JobRun:
    """State of one job while a worker holds it. ``stop()`` is what the Stop button calls."""

    def __init__(self, delivery: Delivery, queue: JobQueue, store: ConversationStore, model: ModelClient,
                 sandboxes: Sandboxes, settings: Settings, http: aiohttp.ClientSession, *,
                 blobs: BlobStore | None = None, memory: MemoryGuard | None = None,
                 profiles: ModelProfiles | None = None, channels: ChannelConfigs | None = None) -> None:
        assert delivery.job is not None
        self.delivery = delivery
        self.job: Job = delivery.job
        self.queue = queue
        self.store = store
        self.model = model
        self.sandboxes = sandboxes
        self.settings = settings
        self.http = http
        self.seq = 0
        self.outbox = Outbox(queue, self.job.reply_stream)
        self.files = JobBlobs(blobs or BlobStore(queue.redis, settings), memory, self.job.id)
        #: the conversation as ``begin`` found it, and the lock token ``begin`` took
        self.state = ConversationState()
        self.token = ""
        self.sandbox: ThreadSandbox | None = None
        self.task: asyncio.Task[Any] | None = None
        self.stopped = False
        #: this job's cells for the thread's notebook (bot/worker/thread_notebook.py), fed by ``emit``
        self.notebook: NotebookRecorder | None = None
        #: the channel's profile and per-channel settings (bot/worker/job_settings.py), per message job
        self.profiles = profiles or ModelProfiles(settings, model)
        self.channels = channels or ChannelConfigs(queue.redis, settings)
        self.setup: JobSettings | None = None

    def event(self, type_: str, payload: dict[str, Any]) -> Event:
        self.seq += 1
        if self.setup is not None and self.setup.note and type_ in ("status", "final"):
            payload = {**payload, "setup": self.setup.note}  # the status line shows what differs
        return Event(job_id=self.job.id, conversation=self.job.conversation, seq=self.seq, type=type_,  # type: ignore[arg-type]
                     payload=payload, meta=self.job.meta)

    async def emit(self, type_: str, payload: dict[str, Any]) -> None:
        event = self.event(type_, payload)
        if self.notebook is not None:
            self.notebook.event(event)  # before the bytes leave for a blob: the notebook keeps images
        if type_ in ("image", "file") and "data_b64" in payload:
            # the bytes go to a blob key first; the event, published after it, carries the key
            event = event.model_copy(update={"payload": await self.files.stash(payload)})
        self.outbox.put(event)

    async def finish(self, final: Event, state_mode: str = "keep") -> None:
        """End the job: unsent events + ``final`` + state + done + ack + unlock, atomically."""
        events = [*await self.outbox.drain(), final.dumps()]
        state = self.store.encode(self.state) if state_mode == "set" else ""
        await self.queue.finish(self.delivery, events, state_mode=state_mode, state=state, token=self.token)

    async def stop(self) -> None:
        """User pressed Stop: interrupt a running cell, or cancel generation."""
        self.stopped = True
        if self.sandbox is not None and self.sandbox.in_cell:
            await self.sandbox.stop()
        elif self.task is not None:
            if self.sandbox is not None:
                self.sandbox.cancelled.set()
            self.task.cancel()

    async def admit(self, limiter: RateLimiter, memory: MemoryGuard | None = None) -> bool:
        """Before a message takes any slot: shed it while Redis is near its maxmemory, and charge
        it to its user's and channel's rate limits unless the adapter's admission at enqueue did
        (the backstop for the console and older adapters; a redelivered job was charged on its
        first delivery). A refused job ends here with an error event that says what to do."""
        if self.job.kind != "message":
            return True
        try:
            if memory is not None and memory.shedding:
                raise ServiceBusy("Redis is past its shed line")
            if self.delivery.deliveries == 1 and not self.delivery.admitted:
                await limiter.take(self.job)
        except Refused as exc:
            metrics.ERRORS.labels(exc.kind).inc()
            metrics.JOBS.labels(exc.kind).inc()
            await self.finish(self.event("error", {
                "kind": exc.kind, "message": exc.user_message(), "retry_after_s": round(exc.retry_after_s, 1)}))
            return False
        return True

    async def execute(self) -> None:
        """Run to a terminal event, then finish (events + state + done + ack) atomically."""
        job, state = self.job, self.state
        if await self._stopped_before_start():
            await self.finish(self.event("final", {"text": "", "cancelled": True, "ok": False, "rounds": 0}))
            metrics.JOBS.labels("cancelled").inc()
            await self._count_usage(None, failed=False)
            return
        turn: Turn | None = None
        mode = "set"
        try:
            if job.kind == "reset":
                final = await self._reset(state)
                mode = "del"
            elif job.kind == "export":
                final = await self._export()
                mode = "keep"
            else:
                self.setup = await job_settings(job, self.settings, self.channels, self.profiles)
                turn = self._turn(state)
                self.task = asyncio.current_task()
                final = await self._message(state, turn)
            outcome = "ok"
        except (JobCancelled, asyncio.CancelledError):
            if not self.stopped:
                raise  # worker shutdown: leave the entry pending for another worker
            if self.task is not None:
                self.task.uncancel()
            final = self.event("final", {"text": (turn.partial or turn.final_text) if turn else "", "cancelled": True,
                                         "ok": False, "rounds": turn.rounds if turn else 0})
            self._record(state, turn)
            outcome = "cancelled"
        except CodeloopError as exc:
            # the user sees exc.user_message(); the detail (hosts, library errors) is for the log only
            log.warning("job %s ended with %s: %s", job.id, exc.kind, exc)
            metrics.ERRORS.labels(exc.kind).inc()
            final = self.event("error", {"kind": exc.kind, "message": exc.user_message()})
            self._record(state, turn)
            outcome = exc.kind
        except Exception as exc:
            log.exception("job %s failed", job.id)
            metrics.ERRORS.labels("internal").inc()
            final = self.event("error", {"kind": "internal",
                                         "message": f"Something went wrong on our side ({type(exc).__name__})."})
            # keep the history as it was; a sandbox created meanwhile is already recorded
            mode = "keep"
            outcome = "internal"
        await self.finish(final, mode)
        metrics.JOBS.labels(outcome).inc()
        metrics.JOB_SECONDS.observe(max(0.0, time.time() - job.created_at))
        failed = final.type == "error" or (outcome == "ok" and turn is not None and turn.last_cell_failed)
        await self._count_usage(turn, failed=failed)

    async def _count_usage(self, turn: Turn | None, *, failed: bool) -> None:
        """A message job's usage, once per job id (bot/queue/usage.py), then on the metrics. After
        ``finish``: accounting never holds up or fails a reply; a Redis error loses this count only."""
        if self.job.kind != "message":
            return
        conv = self.job.conversation
        counts = usage.Counts(jobs=1, rounds=max(0, turn.rounds - 1) if turn else 0,
                              cpu_us=round(turn.cpu_s * 1e6) if turn else 0,
                              tokens_in=turn.tokens_in if turn else 0, tokens_out=turn.tokens_out if turn else 0,
                              failures=int(failed))
        try:
            first = await usage.UsageRecorder(self.queue.redis, self.settings).record(
                self.job.id, conv.platform, conv.channel, self.job.user, counts)
        except (RedisError, OSError) as exc:
            log.warning("usage of job %s not counted: %s", self.job.id, exc)
            return
        if first:
            metrics.count_usage(self.settings, conv.platform, conv.channel, rounds=counts.rounds, cpu_s=counts.cpu_s,
                                tokens_in=counts.tokens_in, tokens_out=counts.tokens_out, failed=failed)

    async def _stopped_before_start(self) -> bool:
        """Stopped while it waited for its turn (marked in Redis), or during this check (``stop``
        found nothing to interrupt yet): never run. After this ``stop`` cancels ``self.task``."""
        return await self.queue.is_cancelled(self.job.id) or self.stopped

    def _turn(self, state: ConversationState) -> Turn:
        setup = self.setup or JobSettings(self.settings.max_rounds, self.settings.system_turn(SYSTEM_PROMPT),
                                          self.model)
        return Turn(model=setup.model, params=GenerationParams.from_settings(self.settings),
                    max_rounds=setup.max_rounds, feedback_chars=self.settings.feedback_chars,
                    system_prompt=setup.system_prompt, history=list(state.history))

    async def _message(self, state: ConversationState, turn: Turn) -> Event:
        job = self.job
        text = job.text.strip()
        if len(text) > self.settings.max_message_chars:
            raise InputRejected(f"The message is {len(text):,} characters; the limit is "
                                f"{self.settings.max_message_chars:,}. Attach long text as a file instead.")
        if not text and not job.attachments:
            raise InputRejected("The message is empty: tell me what to do, e.g. `plot the first column of data.csv`.")
        self._check_uploads()
        self.sandbox = ThreadSandbox(self.sandboxes, state, job.conversation.key, self.settings,
                                     on_new_session=self._record_session)
        if job.attachments:
            await self.emit("status", {"text": "receiving files"})
            names = await self.sandbox.upload(job.attachments)
            text = f"{text}\n\n{files_note(names)}".strip()
        await self.sandbox.begin()
        self.notebook = await asyncio.to_thread(thread_notebook.recorder_for, self.sandbox.files,
                                                job.conversation.key)
        self.notebook.user(text)
        if job.context.strip():  # the thread the bot was just brought into
            context = job.context.strip()[-self.settings.thread_context_chars:]
            text = f"{THREAD_CONTEXT_INTRO}\n{context}\n\n{THREAD_CONTEXT_ASK}\n{text}".strip()
        reply = await turn.run(text, self.emit, self.sandbox)
        self._record(state, turn)
        metrics.ROUNDS.observe(turn.rounds)
        final = self.event("final", {"text": reply, "rounds": turn.rounds, "ok": True})
        self.notebook.event(final)
        try:
            await asyncio.to_thread(thread_notebook.append, self.sandbox.files, self.notebook)
        except OSError as exc:
            log.warning("could not record the notebook of %s: %s", job.conversation.key, exc)
        return final

    async def _export(self) -> Event:
        """The thread as a notebook (bot/worker/thread_notebook.py), answered as a file event."""
        key = self.job.conversation.key
        files = FilesStore.from_settings(self.settings).thread(key)
        data = await asyncio.to_thread(thread_notebook.export, files, key)
        if data is None:
            return self.event("final", {"text": "Nothing to export yet: this thread has no executed cells.",
                                        "rounds": 0, "ok": True, "export": True})
        name = thread_notebook.file_name(self.job.conversation.thread)
        await self.emit("file", {"name": name, "mime": "application/x-ipynb+json", "size": len(data),
                                 "data_b64": base64.b64encode(data).decode()})
        return self.event("final", {"text": f"This thread as a Jupyter notebook: {name}", "rounds": 0,
                                    "ok": True, "export": True})

    def _check_uploads(self) -> None:
        """The adapters refuse oversize and executable uploads already; jobs also reach the stream
        from the console or a future adapter, and inline data can be larger than it claims."""
        limits = InputLimits.from_settings(self.settings)
        downloads = DownloadPolicy(self.settings)  # which URLs may be fetched, and with which token
        for att in self.job.attachments:
            check_upload(Upload(att.name, att.size, att.mime), limits)
            if problem := downloads.refusal(att):
                raise InputRejected(problem)
            if att.data_b64 is None:
                continue
            if len(att.data_b64) // 4 * 3 > limits.max_upload_bytes:  # base64's size, without decoding it
                check_upload(Upload(att.name, len(att.data_b64) // 4 * 3, att.mime), limits)
            try:
                base64.b64decode(att.data_b64, validate=True)
            except ValueError:
                raise InputRejected(f"`{att.name}` arrived damaged (its data is not valid base64); "
                                    "please attach it again.") from None

    async def _reset(self, state: ConversationState) -> Event:
        if state.session_id:
            await self.sandboxes.destroy(state.session_id)
        store = FilesStore.from_settings(self.settings)
        await asyncio.to_thread(store.thread(self.job.conversation.key).remove)
        return self.event("final", {"text": "Started fresh: the conversation, its Python session and its files "
                                            "were reset.",
                                    "rounds": 0, "ok": True, "reset": True})

    async def _record_session(self) -> None:
        """A new container for this thread: store its id now, with the history as it was before this
        job, so a worker that takes the job over after this one dies reattaches to it (one
        container per thread, none left behind) instead of starting another."""
        saved = ConversationState(history=self.state.history, session_id=self.state.session_id,
                                  files=list(self.state.files), settings=self.state.settings, jobs=self.state.jobs)
        await self.store.save(self.job.conversation, saved)

    def _record(self, state: ConversationState, turn: Turn | None) -> None:
        """The state ``finish`` will save: this turn's history and one more job."""
        if turn is not None:
            state.history = turn.history
            if state.history and state.history[-1]["role"] == "user":
                # Keep turns alternating (some chat templates insist) when a reply was cut short.
                state.history.append({"role": "assistant", "content": turn.partial or "(stopped)"})
            state.history = trim_history(state.history, self.settings.history_chars)
        state.jobs += 1
