"""Conversation state in Redis: history in the model's chat format, the sandbox session, files.

One JSON document per conversation. Workers read it when a job begins and write it in the same
script that publishes the job's final event and acks it (``JobQueue.begin`` / ``finish``), so a
job re-run after a worker died starts from the state before it (never from half a turn), and a
turn's answer and its history are never out of step. Expires after ``conversation_ttl_s`` of
inactivity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bot.core.jobs import Conversation
from bot.core.settings import Settings
from bot.llm.base import ChatMessage


@dataclass
class ConversationState:
    history: list[ChatMessage] = field(default_factory=list)
    session_id: str | None = None
    files: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0


def trim_history(history: list[ChatMessage], max_chars: int) -> list[ChatMessage]:
    """The newest messages that fit in ``max_chars``, starting on a user turn; the newest user turn
    and what follows it are always kept. The model never sees more than its context anyway
    (``Turn`` fits each request); this bounds what every job of a long thread reads and writes."""
    last_user = next((i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "user"), 0)
    total, start = 0, len(history)
    for i in range(len(history) - 1, -1, -1):
        total += len(history[i]["content"])
        if total > max_chars and i < last_user:
            break
        start = i
    while start < last_user and history[start]["role"] != "user":
        start += 1
    return history[start:]


class ConversationStore:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def _key(self, conversation: Conversation) -> str:
        return self.settings.key("conv", conversation.key, "state")

    @staticmethod
    def encode(state: ConversationState) -> str:
        # Not dataclasses.asdict: it deep-copies every message, the bulk of a busy worker's CPU.
        return json.dumps({"history": state.history, "session_id": state.session_id, "files": state.files,
                           "settings": state.settings, "jobs": state.jobs})

    @staticmethod
    def decode(raw: str | bytes | None) -> ConversationState:
        if raw is None:
            return ConversationState()
        data = json.loads(raw)
        return ConversationState(
            history=list(data.get("history", [])),
            session_id=data.get("session_id"),
            files=list(data.get("files", [])),
            settings=dict(data.get("settings", {})),
            jobs=int(data.get("jobs", 0)),
        )

    async def load(self, conversation: Conversation) -> ConversationState:
        return self.decode(await self.redis.get(self._key(conversation)))

    async def save(self, conversation: Conversation, state: ConversationState) -> None:
        await self.redis.set(self._key(conversation), self.encode(state), ex=self.settings.conversation_ttl_s)

    async def delete(self, conversation: Conversation) -> None:
        await self.redis.delete(self._key(conversation))
