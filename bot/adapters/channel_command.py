"""The channel-settings command both adapters offer to admins: Slack ``/codeloop``, Discord
``/codeloop-config``. Who counts as an admin is the platform's business (the adapters check it);
what the command does, and every answer it gives, is here.

    (nothing) | show            the channel's settings
    set rounds <0..max>         feedback rounds after the first reply (never above CODELOOP_MAX_ROUNDS)
    set prompt <text>           one extra system-prompt line (empty: none)
    set profile <name>          a CODELOOP_MODEL_PROFILES name, or "default"
    enable | disable            take requests here, or refuse them
    reset                       back to the operator's defaults
    help
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.core.errors import InputRejected
from bot.core.settings import DEFAULT_PROFILE, Settings
from bot.queue.channel_config import FIELDS, PROMPT_CHARS, ChannelConfig, ChannelConfigs

Escape = Callable[[str], str]
Mention = Callable[[str], str]
ACTIONS = ("show", "set", "enable", "disable", "reset", "help")


@dataclass(frozen=True)
class Command:
    action: str
    field: str = ""
    value: str = ""


def parse(text: str) -> Command:
    """``/codeloop <text>`` → a Command; InputRejected (with the usage) for anything else."""
    words = text.strip().split(maxsplit=2)
    if not words:
        return Command("show")
    action = words[0].lower()
    if action not in ACTIONS:
        raise InputRejected(f"Unknown command `{words[0][:20]}`; try `help`.")
    if action != "set":
        if len(words) > 1:
            raise InputRejected(f"`{action}` takes nothing after it; try `help`.")
        return Command(action)
    if len(words) < 2:
        raise InputRejected(f"Set what? One of: {', '.join(f for f in FIELDS if f != 'enabled')}.")
    return Command("set", words[1].lower(), words[2] if len(words) > 2 else "")


def usage(name: str, settings: Settings) -> str:
    profiles = ", ".join([DEFAULT_PROFILE, *sorted(settings.profiles)])
    return "\n".join([
        f"`{name}` — codeloop's settings for this channel (admins only):",
        f"• `{name}` — show them",
        f"• `{name} set rounds <0-{settings.max_rounds}>` — fix-up rounds after the first reply",
        f"• `{name} set prompt <text>` — one extra instruction for the model ({PROMPT_CHARS} characters at "
        "most; nothing after `prompt` removes it)",
        f"• `{name} set profile <name>` — the model: {profiles}",
        f"• `{name} enable` / `{name} disable` — take requests here, or turn them away",
        f"• `{name} reset` — back to the defaults",
    ])


def describe(config: ChannelConfig, settings: Settings, escape: Escape, mention: Mention) -> str:
    """The channel's settings as the admin reads them (``escape`` makes the prompt line inert)."""
    rounds = config.max_rounds(settings)
    shown_rounds = (f"{rounds} (the default)" if config.rounds is None
                    else f"{rounds} (the operator allows up to {settings.max_rounds})")
    profile = config.profile_name(settings)
    if profile != config.profile:
        shown_profile = f"{DEFAULT_PROFILE} (`{escape(config.profile)}` is no longer offered)"
    else:
        shown_profile = profile + (" (the default)" if profile == DEFAULT_PROFILE else "")
    lines = [
        "codeloop in this channel: " + ("on" if config.enabled else "OFF (requests here are turned away)"),
        f"• rounds: {shown_rounds}",
        f"• profile: {shown_profile}; offered: {', '.join([DEFAULT_PROFILE, *sorted(settings.profiles)])}",
        "• prompt: " + (f"“{escape(config.prompt)}”" if config.prompt else "(none)"),
    ]
    if config.by:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(config.at)) if config.at else "earlier"
        lines.append(f"Last changed by {mention(config.by)}, {when}.")
    return "\n".join(lines)


async def run(command: Command, configs: ChannelConfigs, platform: str, channel: str, actor: str, *,
              name: str, escape: Escape, mention: Mention) -> str:
    """Carry out ``command`` for ``channel`` (the caller checked that ``actor`` is an admin);
    the answer to show the admin. A refused value comes back as its explanation."""
    settings = configs.settings
    try:
        if command.action == "help":
            return usage(name, settings)
        if command.action == "reset":
            await configs.reset(platform, channel)
            return "Back to the defaults here.\n" + describe(ChannelConfig(), settings, escape, mention)
        if command.action in ("enable", "disable"):
            config = await configs.set(platform, channel, "enabled", "on" if command.action == "enable" else "off",
                                       actor)
        elif command.action == "set":
            if command.field not in FIELDS or command.field == "enabled":
                raise InputRejected(f"There is no setting `{command.field[:20]}`; "
                                    f"settings: rounds, prompt, profile (and `{name} enable` / `disable`).")
            config = await configs.set(platform, channel, command.field, command.value, actor)
        else:
            config = await configs.get(platform, channel)
    except InputRejected as exc:
        return escape(exc.user_message())
    prefix = "" if command.action == "show" else "Saved. "
    return prefix + describe(config, settings, escape, mention)
