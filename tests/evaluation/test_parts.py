"""The pure parts: building solutions from replies, pass counting per round, cache reuse rules."""

from __future__ import annotations

from bot.evaluation.problems import Problem, build_solution, check_program, reply_code
from bot.evaluation.report import pass_counts, solution_at
from bot.evaluation.solve import Attempt, TaskResult

P = Problem("T/0", "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n", "total",
            "def check(candidate):\n    assert candidate([1, 2]) == 3\n")


def run(source: str) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return namespace


def test_full_function_reply_gets_the_prompts_imports() -> None:
    solution = build_solution(P, "def total(xs: List[int]) -> int:\n    return sum(xs)")
    assert solution.startswith("from typing import List")
    run(check_program(P, solution, "n"))  # raises if the import were missing or the check failed


def test_reply_repeating_the_prompt_is_not_doubled() -> None:
    solution = build_solution(P, P.prompt + "    return sum(xs)")
    assert solution.count("from typing import List") == 1


def test_body_reply_is_appended_to_the_prompt_and_reindented_if_flush_left() -> None:
    assert build_solution(P, "    return sum(xs)") == P.prompt + "    return sum(xs)\n"
    assert build_solution(P, "s = sum(xs)\nreturn s") == P.prompt + "    s = sum(xs)\n    return s\n"
    run(check_program(P, build_solution(P, "s = sum(xs)\nreturn s"), "n"))


def test_reply_code_falls_back_to_an_unfenced_function_only() -> None:
    assert reply_code("x", "print(1)") == "print(1)"
    assert reply_code("def total(xs):\n    return sum(xs)\n", None) is not None
    assert reply_code("I cannot do that.", None) is None
    assert reply_code("Sure, here it is: def total(xs)", None) is None


def result(*passes: bool, stopped: str = "rounds") -> TaskResult:
    return TaskResult("T", [Attempt(f"r{i}", f"s{i}", p) for i, p in enumerate(passes)], stopped)  # type: ignore[arg-type]


def test_pass_counts_are_cumulative_and_ignore_rounds_past_the_limit() -> None:
    tasks = [result(True, stopped="passed"), result(False, True, stopped="passed"),
             result(False, False, True, stopped="passed"), result(False, False, False)]
    assert pass_counts(tasks, 2) == [1, 2, 3]
    assert pass_counts(tasks, 1) == [1, 2]  # a pass at round 2 does not count when N = 1
    assert pass_counts(tasks, 0) == [1]
    assert [solution_at(tasks[1], k) for k in range(3)] == ["s0", "s1", "s1"]


def test_cached_result_is_reused_only_when_it_answers_the_question() -> None:
    late = result(False, False, True, stopped="passed")
    shorter = late.usable_for(1)
    assert shorter is not None and shorter.first_pass is None and len(shorter.attempts) == 2
    assert result(False, False).usable_for(2) is None  # ran 1 feedback round; 2 were asked for
    assert result(False, stopped="no_code").usable_for(5) is not None
