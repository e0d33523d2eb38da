"""``codeloop bench NAME``: benchmarks that print one JSON object per figure per line.

Each benchmark module exposes ``configure(parser)`` and ``main(args) -> int`` and is imported
only when chosen (``generate`` pulls in torch).
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "queue": ("bot.bench.queue", "jobs/s and enqueue->pickup latency through the queue vs raw redis-py"),
    "runner": ("bot.bench.runner", "sandbox cell round trip, pool acquire, HumanEval canonical solutions"),
    "generate": ("bot.bench.generate", "in-process transformers backend: TTFT, tokens/s, batching"),
    "ack": ("bot.bench.ack", "Slack adapter: p99 ack time under 100 concurrent signed events"),
    "replies": ("bot.bench.replies", "adapter reply path: events/s and round trips, one reader vs render leases"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", choices=BENCHES, help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")


def main(args: argparse.Namespace) -> int:
    module_name, help_ = BENCHES[args.bench]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"codeloop bench {args.bench}: {exc} (for `generate`, install codeloop[local])")
        return 2
    parser = argparse.ArgumentParser(prog=f"codeloop bench {args.bench}", description=help_)
    module.configure(parser)
    return int(module.main(parser.parse_args(args.options)) or 0)
