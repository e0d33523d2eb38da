"""What one job runs with: the operator's settings, as its channel's admins narrowed them.

Read once per message job (one HGETALL of the channel's hash, ``bot.queue.channel_config``):
the feedback-round cap (never above CODELOOP_MAX_ROUNDS), the system prompt with the channel's
extra line after it (the only system line under CODELOOP_SYSTEM_PROMPT=none), the model client
of the channel's profile, and the note the status line shows where these differ from the defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bot.agent.prompts import SYSTEM_PROMPT
from bot.core.errors import InputRejected
from bot.core.jobs import Job
from bot.core.settings import DEFAULT_PROFILE, Settings
from bot.llm.base import ModelClient
from bot.llm.profiles import ModelProfiles
from bot.queue.channel_config import CHANNEL_DISABLED, ChannelConfigs

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class JobSettings:
    max_rounds: int
    system_prompt: str | None
    model: ModelClient
    profile: str = DEFAULT_PROFILE
    #: e.g. "model: big · up to 2 fixes"; "" when the channel runs on the defaults
    note: str = ""


async def job_settings(job: Job, settings: Settings, configs: ChannelConfigs, models: ModelProfiles) -> JobSettings:
    """The job's effective settings; InputRejected when its channel is turned off (jobs enqueued
    before an admin turned it off, or by a path that does not check)."""
    config = await configs.get(job.conversation.platform, job.conversation.channel)
    if not config.enabled:
        raise InputRejected(CHANNEL_DISABLED)
    base = settings.system_turn(SYSTEM_PROMPT)
    system = "\n".join(line for line in (base, config.prompt) if line) or None
    profile = config.profile_name(settings)
    if profile != config.profile:
        log.warning("channel %s/%s chose profile %r, which CODELOOP_MODEL_PROFILES no longer lists; using the default",
                    job.conversation.platform, job.conversation.channel, config.profile)
    return JobSettings(max_rounds=config.max_rounds(settings), system_prompt=system, model=models.get(profile),
                       profile=profile, note=config.note(settings))
