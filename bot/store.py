"""Conversation state in Redis: history in the model's chat format, the sandbox session, files.

One JSON document per conversation, written only when a job finishes, so a job re-run after a
worker died starts from the state before it (never from half a turn). Expires after
``conversation_ttl_s`` of inactivity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bot.jobs import Conversation
from bot.llm.base import ChatMessage
from bot.settings import Settings


@dataclass
class ConversationState:
    history: list[ChatMessage] = field(default_factory=list)
    session_id: str | None = None
    files: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0


class ConversationStore:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def _key(self, conversation: Conversation) -> str:
        return self.settings.key("conv", conversation.key, "state")

    async def load(self, conversation: Conversation) -> ConversationState:
        raw = await self.redis.get(self._key(conversation))
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

    async def save(self, conversation: Conversation, state: ConversationState) -> None:
        await self.redis.set(self._key(conversation), json.dumps(asdict(state)), ex=self.settings.conversation_ttl_s)

    async def delete(self, conversation: Conversation) -> None:
        await self.redis.delete(self._key(conversation))
