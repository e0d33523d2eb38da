"""The two wire contracts: a Job (adapter -> worker) and an Event (worker -> adapter).

Both travel as JSON in the ``data`` field of a Redis stream entry. A Job that fails to parse
or carries an unknown schema version is poison: it is dead-lettered with the reason.

Every string that enters either is encodable: a lone UTF-16 surrogate (which chat JSON, a file
name that is not UTF-8, or an exception's text can carry) would make the JSON fail far from
where it came in. A Job's strings are cleaned when it is built or read (``CleanStrings``); an Event's
payload, built from whatever a cell printed, is cleaned when it is written, only if it must be.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
import uuid
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticSerializationError

from bot.core.errors import PoisonJob

SCHEMA_VERSION: Literal[1] = 1

JobKind = Literal["message", "stop", "reset", "export"]
EventType = Literal["status", "delta", "code", "output", "image", "file", "final", "error"]
#: the files a sandbox returns with a flooded stream's full text (runner/sandbox/files.py); an
#: ``output`` event lists those that follow it as ``full_output_files``
FULL_OUTPUT_FILES = ("stdout.txt", "stderr.txt")
TERMINAL_EVENTS: frozenset[str] = frozenset({"final", "error"})
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` made safe to encode: a lone UTF-16 surrogate (``"\\ud800"``, which chat JSON can
    carry) becomes U+FFFD, a surrogate pair left as two code points is joined into its character,
    and NUL characters are dropped.

    A lone surrogate cannot be encoded as UTF-8, so it would crash the job's JSON on its way to
    Redis, the model request or a log line, far from here. NUL is dropped rather than replaced: no chat
    client shows it, it means nothing in a request, and C-string consumers downstream (log
    viewers, native tokenizers) may cut the text at it; removing it loses nothing the user saw.
    """
    if _SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.replace("\x00", "") if "\x00" in text else text


def encodable_tree(value: Any) -> Any:
    """``encodable`` applied to every string (keys included) in nested dicts and lists."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {encodable_tree(k): encodable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encodable_tree(v) for v in value]
    return value


class CleanStrings(BaseModel):
    """A model whose string fields are ``encodable`` once built or read: one validator per model
    with a cheap test per string (``isascii`` is O(1) in CPython), since a job is built and read
    on the hot path and almost every string is clean already."""

    @model_validator(mode="after")
    def _encodable(self) -> Self:
        for name, value in list(self.__dict__.items()):
            if isinstance(value, str) and ("\x00" in value or (not value.isascii() and _SURROGATE.search(value))):
                object.__setattr__(self, name, encodable(value))  # frozen models too
        return self


def _lenient_json(raw: str | bytes) -> Any:
    """The stdlib parser accepts a lone surrogate escape (``"\\ud83d"``), which pydantic's refuses;
    the models' ``CleanStrings`` check then replaces it. Anything else it cannot read stays unreadable."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


class Conversation(CleanStrings):
    """Where a conversation lives: platform / workspace / channel / thread."""

    model_config = ConfigDict(frozen=True)

    platform: str
    workspace: str = "-"
    channel: str
    thread: str

    @functools.cached_property
    def key(self) -> str:  # frozen, so computed once (a worker asks ~20 times per job)
        return f"{self.platform}/{self.workspace}/{self.channel}/{self.thread}"


class Attachment(CleanStrings):
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


class Job(CleanStrings):
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
    #: a stop's job: the id of the one job to stop (None: whatever runs in the conversation)
    target: str | None = None
    reply_stream: str
    created_at: float = Field(default_factory=time.time)
    #: position in its conversation, assigned by the queue at enqueue (order per thread)
    seq: int = 0
    #: what was said before the bot was brought in (a thread's earlier messages, read by the
    #: adapter): given to the model with this turn's text; untrusted, like the text itself
    context: str = ""
    #: adapter-private data echoed back on every event (e.g. Slack message ts to edit)
    meta: dict[str, Any] = Field(default_factory=dict)

    def dumps(self) -> str:
        try:
            return self.model_dump_json()
        except PydanticSerializationError:  # only ``meta`` can still hold an unencodable string
            return self.model_copy(update={"meta": encodable_tree(self.meta)}).model_dump_json()

    @classmethod
    def loads(cls, raw: str | bytes) -> Job:
        try:
            try:
                return cls.model_validate_json(raw)
            except ValidationError as exc:
                data = _lenient_json(raw) if exc.errors()[0]["type"] == "json_invalid" else None
                if data is None:
                    raise
                return cls.model_validate(data)
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
        try:
            return self.model_dump_json()
        except PydanticSerializationError:  # error text or output carrying a lone surrogate
            return Event.model_validate(encodable_tree(self.model_dump())).model_dump_json()

    @classmethod
    def loads(cls, raw: str | bytes) -> Event:
        return cls.model_validate_json(raw)
