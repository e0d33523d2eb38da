"""Real codeloop processes for tests that kill them (``kill -9`` mid-job, then another takes over)."""

from __future__ import annotations

import asyncio
import os
import sys

from bot.core.settings import Settings


async def worker_process(settings: Settings, key_prefix: str, **env: str) -> asyncio.subprocess.Process:
    """``codeloop worker`` in a process of its own on the test's Redis prefix and model server, with
    no warm pool and a 1 s claim idle (so a survivor takes a dead one's job at once); ``env`` adds
    or overrides ``CODELOOP_*`` variables."""
    assert settings.llm_url is not None, "the worker process needs the test's model server"
    base = {"CODELOOP_REDIS_URL": settings.redis_url, "CODELOOP_KEY_PREFIX": key_prefix,
            "CODELOOP_LLM_URL": settings.llm_url, "CODELOOP_CLAIM_IDLE_S": "1", "CODELOOP_SANDBOX_POOL_SIZE": "0",
            "CODELOOP_SANDBOX_IMAGE": settings.sandbox_image}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "bot.cli", "worker",
                                                env={**os.environ, **base, **env},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
