"""The two wire contracts: a Job (adapter -> worker) and an Event (worker -> adapter).

Both travel as JSON in the ``data`` field of a Redis stream entry. A Job that fails to parse
or carries an unknown schema version is poison: it is dead-lettered with the reason.
"""

from __future__ import annotations

import base64
import functools
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.errors import PoisonJob

SCHEMA_VERSION: Literal[1] = 1

JobKind = Literal["message", "stop", "reset"]
EventType = Literal["status", "delta", "code", "output", "image", "file", "final", "error"]
TERMINAL_EVENTS: frozenset[str] = frozenset({"final", "error"})


class Conversation(BaseModel):
    """Where a conversation lives: platform / workspace / channel / thread."""

    model_config = ConfigDict(frozen=True)

    platform: str
    workspace: str = "-"
    channel: str
    thread: str

    @functools.cached_property
    def key(self) -> str:  # frozen, so computed once (a worker asks ~20 times per job)
        return f"{self.platform}/{self.workspace}/{self.channel}/{self.thread}"


class Attachment(BaseModel):
    """A user upload. Either ``url`` (fetched by the worker with the platform's token, named by
    ``auth``) or ``data_b64`` (small files sent inline, e.g. from the console)."""

    name: str
    size: int = Field(ge=0)
    mime: str = "application/octet-stream"
    url: str | None = None
    auth: Literal["none", "slack", "discord"] = "none"
    data_b64: str | None = None

    def data(self) -> bytes | None:
        return base64.b64decode(self.data_b64) if self.data_b64 is not None else None


class Job(BaseModel):
    # cache_strings="keys": pydantic's JSON string cache would otherwise fill with job ids, texts and
    # event ids that never repeat (a worker's RSS creeping up by ~1 MiB before the cache is full)
    model_config = ConfigDict(extra="ignore", cache_strings="keys")

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    idempotency_key: str
    conversation: Conversation
    user: str
    text: str = ""
    attachments: list[Attachment] = Field(default_factory=list)
    kind: JobKind = "message"
    reply_stream: str
    created_at: float = Field(default_factory=time.time)
    #: position in its conversation, assigned by the queue at enqueue (order per thread)
    seq: int = 0
    #: adapter-private data echoed back on every event (e.g. Slack message ts to edit)
    meta: dict[str, Any] = Field(default_factory=dict)

    def dumps(self) -> str:
        return self.model_dump_json()

    @classmethod
    def loads(cls, raw: str | bytes) -> Job:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "job"
            raise PoisonJob(f"malformed job ({where}: {first['msg']})") from None


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", cache_strings="keys")

    job_id: str
    conversation: Conversation
    seq: int
    type: EventType
    payload: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    ts: float = Field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def dumps(self) -> str:
        return self.model_dump_json()

    @classmethod
    def loads(cls, raw: str | bytes) -> Event:
        return cls.model_validate_json(raw)
