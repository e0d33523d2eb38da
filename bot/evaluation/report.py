"""Pass@1 per round, the JSON report, EvalPlus sample files and the terminal table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.evaluation.problems import Problem
from bot.evaluation.solve import TaskResult

# Seed README (OpenCodeInterpreter), HumanEval pass@1: without feedback -> with 1 round of it.
PUBLISHED_HUMANEVAL: dict[str, tuple[float, float]] = {
    "m-a-p/OpenCodeInterpreter-DS-1.3B": (65.2, 65.2),
    "m-a-p/OpenCodeInterpreter-DS-6.7B": (76.2, 81.1),
    "m-a-p/OpenCodeInterpreter-DS-33B": (79.3, 82.9),
}


def pass_counts(results: list[TaskResult], rounds: int) -> list[int]:
    """Tasks passing by round k, for k = 0..rounds: a pass at round j counts for every k >= j,
    and only the first ``rounds`` feedback rounds count."""
    counts = [0] * (rounds + 1)
    for result in results:
        first = result.first_pass
        if first is not None and first <= rounds:
            for k in range(first, rounds + 1):
                counts[k] += 1
    return counts


def solution_at(result: TaskResult, round_no: int) -> str:
    """The task's solution as it stood after ``round_no`` rounds (a task that stopped keeps its last)."""
    if not result.attempts:
        return ""
    return result.attempts[min(round_no, len(result.attempts) - 1)].solution


def write_outputs(out: Path, problems: list[Problem], results: dict[str, TaskResult], rounds: int,
                  meta: dict[str, Any]) -> dict[str, Any]:
    """report.json and samples_round{k}.jsonl (EvalPlus: ``evalplus.evaluate --samples FILE``)."""
    ordered = [results[p.task_id] for p in problems]
    counts = pass_counts(ordered, rounds)
    total = len(ordered)
    for k in range(rounds + 1):
        lines = [json.dumps({"task_id": r.task_id, "solution": solution_at(r, k)}) for r in ordered]
        (out / f"samples_round{k}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    report: dict[str, Any] = {
        **meta,
        "rounds": rounds,
        "tasks": total,
        "passed": counts,
        "pass@1": [round(100.0 * c / total, 2) if total else 0.0 for c in counts],
        "no_code": sorted(r.task_id for r in ordered if r.stopped == "no_code"),
        "failed": sorted(r.task_id for r in ordered if r.first_pass is None or r.first_pass > rounds),
        "per_task": {
            r.task_id: {"first_pass": r.first_pass, "attempts": len(r.attempts), "stopped": r.stopped,
                        "last_feedback": r.attempts[-1].feedback if r.attempts else None}
            for r in ordered
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def table(report: dict[str, Any]) -> str:
    """The seed README's view: pass@1 after 0, 1, ... feedback rounds."""
    total = report["tasks"]
    lines = [f"{report['benchmark']}: {total} tasks, model {report['model']}", "",
             "feedback rounds  passed       pass@1"]
    for k, (count, rate) in enumerate(zip(report["passed"], report["pass@1"], strict=True)):
        lines.append(f"{k:>15}  {count:>4}/{total:<6}  {rate:6.1f}%")
    published = PUBLISHED_HUMANEVAL.get(report["model"]) if report["benchmark"] == "humaneval" else None
    if published is not None:
        lines.append(f"seed README for this model: {published[0]} (no feedback) -> {published[1]} (1 round)")
    lines.append(f"({report['model_requests']} model requests this run, {report['cached']} tasks from cache, "
                 f"{report['elapsed_s']:.1f} s)")
    return "\n".join(lines)
