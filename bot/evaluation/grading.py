"""Grading one solution in a fresh sandbox kernel: base tests, then the plus tests if the set has them.

HumanEval and MBPP are one cell: solution, tests, nonce. EvalPlus's sets are three cells in one
fresh kernel: the reference runs first (difftest.prepare: expected outputs and per-input time
limits, before any of the model's code exists in the process), then the solution against the base
inputs, then, only if those pass, the solution again against the plus inputs. The model is shown
the output of the cell that failed, so a task that passes its base tests and fails a plus test is
told about the plus input, as OpenCodeInterpreter's "plus" runs told their model.
"""

from __future__ import annotations

import ast
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from bot.core.errors import ConfigError
from bot.evaluation import difftest
from bot.evaluation.checker import CheckPool, Runner
from bot.evaluation.problems import Problem, check_program
from runner.results import ExecutionResult

# EvalPlus's per-input limits as OpenCodeInterpreter ran them: max(1 s, 4 x the reference's time).
MIN_TIME_LIMIT_S = 1.0
TIME_LIMIT_FACTOR = 4.0
#: the reference solution's cell (it runs every base and plus input once)
REFERENCE_TIMEOUT_S = 120.0
#: a solution cell never runs longer than this, whatever the sum of its per-input limits
MAX_CELL_S = 300.0

DIFFTEST_SOURCE = Path(difftest.__file__).read_text(encoding="utf-8")


@dataclass
class Verdict:
    base: bool
    #: the plus tests passed too; None when the problem has none
    plus: bool | None
    #: the cell whose output the model is shown (the failing one, else the last)
    shown: ExecutionResult

    @property
    def passed(self) -> bool:
        """Everything the problem tests: base, and plus where there are plus tests."""
        return self.base and self.plus is not False


def reached(result: ExecutionResult, nonce: str) -> bool:
    return result.ok and any(r.text == repr(nonce) for r in result.results)


def prepare_program(problem: Problem) -> str:
    assert problem.plus is not None
    plus = problem.plus
    oracle = difftest.ORACLES.get((problem.suite, problem.entry_point))
    inputs = json.dumps({"base": plus.base_input, "plus": plus.plus_input})
    return (
        f"_codeloop_difftest = {{'__name__': '_codeloop_difftest'}}\n"
        f"exec(compile({DIFFTEST_SOURCE!r}, '<codeloop-difftest>', 'exec'), _codeloop_difftest)\n"
        f"_codeloop_verdict = _codeloop_difftest['verdict']\n"
        f"_codeloop_difftest['prepare']({plus.reference!r}, {problem.entry_point!r}, {inputs!r}, {plus.recipe!r},"
        f" {oracle!r}, {plus.atol!r}, {MIN_TIME_LIMIT_S!r}, {TIME_LIMIT_FACTOR!r})\n"
    )


def verdict_program(problem: Problem, solution: str, group: str, nonce: str) -> str:
    return f"{solution}\n\n_codeloop_verdict(globals(), {problem.entry_point!r}, {group!r}, {nonce!r})\n"


def _budgets(problem: Problem, result: ExecutionResult) -> tuple[float, float]:
    """The time budgets ``prepare`` returned; a reference that failed is a problem with the data."""
    texts = [r.text for r in result.results if r.text]
    if result.ok and texts and len(texts[-1]) < 100:  # "(1.5, 31.2)"; anything else is not prepare's answer
        try:
            base, plus = ast.literal_eval(texts[-1])
            return float(base), float(plus)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    why = result.error.traceback if result.error else ("timed out" if result.timed_out else result.stdout)
    raise ConfigError(f"{problem.task_id}: the reference solution (prompt + canonical_solution) failed in the "
                      f"sandbox, so expected outputs cannot be computed: {str(why)[-600:]}")


class Grader:
    def __init__(self, pool: CheckPool) -> None:
        self.pool = pool

    async def grade(self, problem: Problem, solution: str) -> Verdict:
        if problem.plus is None:
            nonce = _nonce()
            result = await self.pool.check(check_program(problem, solution, nonce))
            return Verdict(reached(result, nonce), None, result)
        return await self.pool.check_with(lambda run: self._evalplus(run, problem, solution))

    async def _evalplus(self, run: Runner, problem: Problem, solution: str) -> Verdict:
        budgets = _budgets(problem, await run(prepare_program(problem), max(REFERENCE_TIMEOUT_S, self.pool.timeout_s)))
        verdicts = []
        for group, budget in zip(("base", "plus"), budgets, strict=True):
            nonce = _nonce()
            limit = max(self.pool.timeout_s, min(budget + 1.0, MAX_CELL_S))
            result = await run(verdict_program(problem, solution, group, nonce), limit)
            verdicts.append(reached(result, nonce))
            if not verdicts[-1]:
                break
        return Verdict(verdicts[0], len(verdicts) == 2 and verdicts[1], result)


def _nonce() -> str:
    return f"codeloop-pass-{secrets.token_hex(8)}"
