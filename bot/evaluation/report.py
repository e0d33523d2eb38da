"""Pass@1 per round, the seed's table beside the measured one, report.json, EvalPlus samples, the terminal table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.evaluation.problems import Problem
from bot.evaluation.published import ROW_LABELS, SOURCE, Row, published_model, published_rows
from bot.evaluation.solve import Attempt, TaskResult, Track, first_index


def pass_counts(results: list[TaskResult], rounds: int, track: Track = "execution", base: bool = False) -> list[int]:
    """Tasks passing by round k, for k = 0..rounds: a pass at round j counts for every k >= j,
    and only the first ``rounds`` feedback rounds count. ``base``: the base tests only."""
    counts = [0] * (rounds + 1)
    for result in results:
        first = first_index(result.track(track), base)
        if first is not None and first <= rounds:
            for k in range(first, rounds + 1):
                counts[k] += 1
    return counts


def solution_at(attempts: list[Attempt] | TaskResult, round_no: int, base: bool = False) -> str:
    """The solution as it stood after ``round_no`` rounds: a track that stopped keeps its last, and
    the base column's track stops at its first base pass (as OpenCodeInterpreter's base run did)."""
    track = attempts.attempts if isinstance(attempts, TaskResult) else attempts
    if not track:
        return ""
    last = len(track) - 1
    if base:
        first = first_index(track, base=True)
        last = last if first is None else first
    return track[min(round_no, last)].solution


def _rate(count: int, total: int) -> float:
    return round(100.0 * count / total, 2) if total else 0.0


def _columns(ordered: list[TaskResult], rounds: int, track: Track, plus: bool) -> dict[str, Any]:
    total = len(ordered)
    base = pass_counts(ordered, rounds, track, base=True)
    out: dict[str, Any] = {"passed": base, "pass@1": [_rate(c, total) for c in base]}
    if plus:
        both = pass_counts(ordered, rounds, track)
        out.update({"passed_plus": both, "pass@1_plus": [_rate(c, total) for c in both]})
    return out


def compare(measured: dict[Row, dict[str, float | None]], model: str, suite: str) -> dict[str, Any] | None:
    """The README's rows for this model beside the measured ones, with measured - published."""
    published = published_rows(model, suite)
    if not published:
        return None
    rows: dict[str, Any] = {}
    for row, (base, plus) in published.items():
        got = measured.get(row)
        pub = {"base": base, "plus": plus}
        diff = None if got is None else {k: None if got[k] is None else round(got[k] - pub[k], 2)  # type: ignore[operator]
                                         for k in ("base", "plus")}
        rows[row] = {"published": pub, "measured": got, "difference": diff}
    return {"model": published_model(model), "benchmark": suite, "source": SOURCE, "rows": rows}


def _samples(out: Path, name: str, ordered: list[TaskResult], rounds: int, track: Track, base: bool) -> None:
    for k in range(rounds + 1):
        lines = [json.dumps({"task_id": r.task_id, "solution": solution_at(r.track(track), k, base)}) for r in ordered]
        (out / f"{name}{k}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_outputs(out: Path, problems: list[Problem], results: dict[str, TaskResult], rounds: int,
                  meta: dict[str, Any]) -> dict[str, Any]:
    """report.json and EvalPlus sample files (``evalplus.evaluate --samples FILE``):
    samples_round{k}.jsonl (the track as it stood after k rounds), and with plus tests
    samples_base_round{k}.jsonl (the base column's track); samples_hf_* the same for human feedback."""
    ordered = [results[p.task_id] for p in problems]
    plus = any(p.plus is not None for p in problems)
    human = meta.get("critic") is not None
    total = len(ordered)
    tracks: list[tuple[Track, str]] = [("execution", "samples_")]
    if human:
        tracks.append(("human", "samples_hf_"))
    for track, prefix in tracks:
        _samples(out, f"{prefix}round", ordered, rounds, track, base=False)
        if plus:
            _samples(out, f"{prefix}base_round", ordered, rounds, track, base=True)

    report: dict[str, Any] = {**meta, "rounds": rounds, "tasks": total, "plus": plus,
                              **_columns(ordered, rounds, "execution", plus)}
    if human:
        report["human_feedback"] = _columns(ordered, rounds, "human", plus)

    def row(source: dict[str, Any], k: int) -> dict[str, float | None]:
        return {"base": source["pass@1"][k], "plus": source["pass@1_plus"][k] if plus else None}

    measured: dict[Row, dict[str, float | None]] = {"no_feedback": row(report, 0)}
    if rounds >= 1:  # the README's feedback rows are after exactly one round
        measured["execution_feedback"] = row(report, 1)
        if human:
            measured["human_feedback_oracle" if meta.get("critic_oracle") else "human_feedback"] = \
                row(report["human_feedback"], 1)
    report["rows"] = measured
    report["published"] = compare(measured, str(meta.get("model", "")), str(meta.get("suite", "humaneval")))
    report["no_code"] = sorted(r.task_id for r in ordered if r.stopped == "no_code")
    report["failed"] = sorted(r.task_id for r in ordered if r.first_pass is None or r.first_pass > rounds)
    report["per_task"] = {
        r.task_id: {"first_pass": r.first_pass, "first_base_pass": first_index(r.attempts, base=True),
                    "attempts": len(r.attempts), "stopped": r.stopped,
                    "last_feedback": r.attempts[-1].feedback if r.attempts else None,
                    **({"human_first_pass": first_index(r.track("human")), "human_stopped": r.human_stopped,
                        "critiques": r.critiques} if human else {})}
        for r in ordered
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _cell(base: float | None, plus: float | None, signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    if base is None:
        return "-"
    return fmt.format(base) + ("" if plus is None else f" ({fmt.format(plus)})")


def table(report: dict[str, Any]) -> str:
    """The seed README's view: pass@1 after 0, 1, ... feedback rounds, base (plus), then the
    README's row for this model beside the measured one."""
    total, plus = report["tasks"], report.get("plus", False)
    lines = [f"{report['benchmark']}: {total} tasks, model {report['model']}", ""]
    head = "feedback rounds  passed       pass@1" + ("   passed (+)   pass@1 (+)" if plus else "")
    sections = [("execution feedback", report)]
    if "human_feedback" in report:
        sections.append(("synth. human feedback", report["human_feedback"]))
    for n, (title, data) in enumerate(sections):
        if n:
            lines.append("")
        if len(sections) > 1:
            lines.append(f"{title}:")
        lines.append(head)
        for k, (count, rate) in enumerate(zip(data["passed"], data["pass@1"], strict=True)):
            line = f"{k:>15}  {count:>4}/{total:<6}  {rate:6.1f}%"
            if plus:
                line += f"   {data['passed_plus'][k]:>4}/{total:<6}  {data['pass@1_plus'][k]:6.1f}%"
            lines.append(line)
    published = report.get("published")
    if published:
        lines += ["", f"seed README, {published['model']} on {published['benchmark']} (pass@1, base (plus)):",
                  f"{'':<34}{'published':<16}{'measured':<16}difference"]
        for row, data in published["rows"].items():
            pub, got, diff = data["published"], data["measured"] or {}, data["difference"] or {}
            lines.append(f"{ROW_LABELS[row]:<34}{_cell(pub['base'], pub['plus']):<16}"
                         f"{_cell(got.get('base'), got.get('plus')):<16}"
                         f"{_cell(diff.get('base'), diff.get('plus'), signed=True)}")
        if published["benchmark"] == "mbpp" and not plus:
            lines.append("(the README's MBPP column is MBPP+'s task set and base inputs; this file is not MBPP+)")
    lines.append(f"({report['model_requests']} model requests this run"
                 + (f", {report['critic_requests']} critic requests" if "critic_requests" in report else "")
                 + f", {report['cached']} tasks from cache, {report['elapsed_s']:.1f} s)")
    return "\n".join(lines)
