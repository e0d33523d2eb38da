"""The worker's model clients by profile: its own backend, and CODELOOP_MODEL_PROFILES' servers.

A channel's admins may pick a profile (``bot.queue.channel_config``); the worker asks here for its
client per job. Each profile's ``TGIClient`` is made on first use and kept (its HTTP pool is
shared by that profile's requests), so a worker talks only to the servers its channels use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.core.settings import DEFAULT_PROFILE, Settings
from bot.llm.base import ModelClient

if TYPE_CHECKING:
    from bot.llm.tgi import TGIClient


class ModelProfiles:
    def __init__(self, settings: Settings, default: ModelClient) -> None:
        self.settings = settings
        self.default = default
        self._clients: dict[str, TGIClient] = {}

    def get(self, name: str) -> ModelClient:
        """The client for profile ``name``; the default backend for "default" or a name the
        operator no longer lists."""
        if name == DEFAULT_PROFILE:
            return self.default
        client = self._clients.get(name)
        if client is None:
            profile = self.settings.profiles.get(name)
            if profile is None:
                return self.default
            from bot.llm.tgi import TGIClient

            s = self.settings
            client = self._clients[name] = TGIClient(
                profile.url, model=profile.model or s.model,
                token=s.llm_token.get_secret_value() if s.llm_token else None,
                context_tokens=s.context_tokens, timeout_s=s.llm_timeout_s, retries=s.llm_retries,
                backoff_s=s.llm_backoff_s)
        return client

    async def aclose(self) -> None:
        """Close the profiles' clients (the default one belongs to whoever made it)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
