"""The model interface: stream a chat completion as text deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

if TYPE_CHECKING:
    from bot.core.settings import Settings


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationParams:
        return cls(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=tuple(settings.stop),
        )


@dataclass
class TokenUsage:
    """The tokens one generation used, filled in by the backend's stream by the time it ends (or
    is cancelled): what the usage accounting (bot/queue/usage.py) counts. ``exact`` is False when
    the figures are this side's estimate (a server that did not report them)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    exact: bool = True


class ModelClient(Protocol):
    """One async streaming interface over every backend.

    ``stream_chat`` yields text deltas of the assistant's reply; cancelling the consuming task
    stops generation for that conversation only. ``count_tokens`` measures a prompt the way the
    backend will see it (exact for in-process models, an estimate for remote servers) so the
    agent can drop the oldest turns when the context is too long. A ``usage`` record passed to
    ``stream_chat`` holds the generation's prompt and completion tokens once the stream ends.
    """

    context_tokens: int

    def stream_chat(self, messages: list[ChatMessage], params: GenerationParams,
                    usage: TokenUsage | None = None) -> AsyncIterator[str]: ...

    def count_tokens(self, messages: list[ChatMessage]) -> int: ...

    async def aclose(self) -> None: ...
