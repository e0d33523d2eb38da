"""``codeloop`` command line: each command lives in its own module, imported only when used.

A command module exposes ``configure(parser)`` and ``main(args) -> int``. Start-up errors that
are ours (bad settings, missing image, unreachable Redis) print one line and exit 2. That line is
the error's detail, not its chat-user text: whoever runs the command operates the bot and needs
the address that did not answer.

Logging is set up here, once, for every command: level and format (``CODELOOP_LOG_LEVEL``,
``CODELOOP_LOG_JSON``) come from the settings, so the bots log like the worker does. Settings too
broken to read leave the default plain format; the command itself then reports them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bot.core.errors import CodeloopError, ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "console": ("bot.adapters.console", "chat in the terminal through the queue (starts a worker if none runs)"),
    "worker": ("bot.worker.service", "consume jobs: generate, run code in sandboxes, publish replies"),
    "slack": ("bot.adapters.slack.cli", "run the Slack bot (Socket Mode, or HTTP Events API)"),
    "discord": ("bot.adapters.discord.cli", "run the Discord bot (/code slash command)"),
    "sandbox": ("runner.cli", "build the sandbox image, list, reap or clean sandboxes"),
    "doctor": ("bot.ops.doctor", "check Redis, Docker, the sandbox image, the model and tokens"),
    "usage": ("bot.ops.usage", "jobs, feedback rounds, sandbox CPU, tokens and failures per channel and user"),
    "eval": ("bot.evaluation.cli", "pass@1 with execution/human feedback: HumanEval(+), MBPP(+)"),
    "bench": ("bot.bench.cli", "benchmarks: queue | runner | generate | ack | replies"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: codeloop COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `codeloop COMMAND --help` for a command's options. Settings come from CODELOOP_* variables."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from bot import __version__

        print(f"codeloop {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"codeloop: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"codeloop {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(rest)
    setup_logging()
    try:
        return int(module.main(args) or 0)
    except CodeloopError as exc:
        print(f"codeloop {name}: {str(exc) or exc.user_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def setup_logging() -> None:
    from bot.core.settings import Settings
    from bot.ops.metrics import setup_logging as apply

    try:
        settings = Settings.load()
    except ConfigError:
        settings = Settings.model_construct()  # the defaults; the command names the bad setting
    apply(settings)


if __name__ == "__main__":
    raise SystemExit(main())
