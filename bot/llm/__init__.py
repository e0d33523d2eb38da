"""Model backends behind one async streaming interface (``ModelClient``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.llm.base import ChatMessage, GenerationParams, ModelClient

if TYPE_CHECKING:
    from bot.core.settings import Settings

__all__ = ["ChatMessage", "GenerationParams", "ModelClient", "make_client"]


def make_client(settings: Settings) -> ModelClient:
    """The backend the settings name: a TGI/OpenAI-compatible server, or an in-process model."""
    if settings.backend == "tgi":
        from bot.llm.tgi import TGIClient

        return TGIClient.from_settings(settings)
    from bot.llm.local import LocalModelClient

    client: ModelClient = LocalModelClient.from_settings(settings)
    return client
