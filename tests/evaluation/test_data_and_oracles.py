"""Reading the benchmark files, EvalPlus's comparison rules (run here on the host, as in the
sandbox), the cache rules of the human-feedback track, and the seed-vs-measured comparison."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from bot.core.errors import ConfigError
from bot.evaluation import difftest
from bot.evaluation.datasets import load_problems
from bot.evaluation.report import compare, pass_counts, solution_at
from bot.evaluation.solve import Attempt, TaskResult


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mbpp_row(task_id: int, **over: Any) -> dict[str, Any]:
    row = {"task_id": task_id, "text": "Find the shared elements.",
           "code": "def shared(a, b):\n    return set(a) & set(b)",
           "test_list": ["assert set(shared((1, 2), (2, 3))) == {2}", "assert shared((), ()) == set()"],
           "test_setup_code": "import math", "challenge_test_list": ["assert shared((1,), (1,)) == {1}"]}
    return {**row, **over}


def test_original_mbpp_prompt_entry_point_tests_and_test_split(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "mbpp.jsonl", [mbpp_row(3), mbpp_row(11), mbpp_row(510), mbpp_row(511)])
    problems = load_problems("mbpp", data)
    assert [p.task_id for p in problems] == ["Mbpp/11", "Mbpp/510"]  # the test split only
    p = problems[0]
    assert p.prompt == '"""\nFind the shared elements.\nassert set(shared((1, 2), (2, 3))) == {2}\n"""\n'
    assert p.entry_point == "shared"  # not `set`, which the test calls first
    assert p.test == "import math\nassert set(shared((1, 2), (2, 3))) == {2}\nassert shared((), ()) == set()"
    assert p.suite == "mbpp" and p.plus is None and p.canonical_solution is not None
    assert len(load_problems("mbpp", data, all_tasks=True)) == 4


def test_sanitized_mbpp_and_mbpp_plus_shapes(tmp_path: Path) -> None:
    sanitized = tmp_path / "sanitized-mbpp.json"
    sanitized.write_text(json.dumps([{"source_file": "x", "task_id": 2, "prompt": "Shared elements.",
                                      "code": "def shared(a, b):\n    return set(a) & set(b)",
                                      "test_imports": ["import math"],
                                      "test_list": ["assert shared([1], [1]) == {1}"]}]))
    (s,) = load_problems("mbpp", sanitized)
    assert s.task_id == "Mbpp/2" and s.test.startswith("import math\n") and "Shared elements." in s.prompt

    plus = tmp_path / "MbppPlus.jsonl.gz"
    row = {"task_id": "Mbpp/106", "prompt": '"""\nAppend.\n"""\n', "entry_point": "add_lists", "atol": 0,
           "canonical_solution": "def add_lists(a, t):\n    return t + tuple(a)\n",
           "base_input": [[[1], [2]]], "plus_input": []}
    with gzip.open(plus, "wt") as fh:
        fh.write(json.dumps(row) + "\n")
    (m,) = load_problems("mbpp", plus)
    assert m.plus is not None and m.plus.recipe == "second_arg_to_tuple"
    assert m.plus.reference == row["prompt"] + row["canonical_solution"]


def test_bad_files_name_the_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: missing or non-string field\(s\) entry_point"):
        load_problems("humaneval", jsonl(tmp_path / "bad.jsonl", [
            {"task_id": "a", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c): pass"},
            {"task_id": "b", "prompt": "def g():\n", "test": "def check(c): pass"}]))
    with pytest.raises(ConfigError, match="needs --data"):
        load_problems("mbpp", None)
    with pytest.raises(ConfigError, match="test_list"):
        load_problems("mbpp", jsonl(tmp_path / "m.jsonl", [mbpp_row(11, test_list=[])]))


def test_mbpp_plus_inputs_become_tuples_sets_and_complex_numbers() -> None:
    assert difftest.mbpp_recipe(106) == "second_arg_to_tuple" and difftest.mbpp_recipe(11) is None
    assert difftest.deserialize("second_arg_to_tuple", [[[5, 6], [9, 10]]]) == [[[5, 6], (9, 10)]]
    assert difftest.deserialize("sets_115", [[[[1, 2], []]]]) == [[[{1, 2}, {}]]]  # {} as EvalPlus makes it
    assert difftest.deserialize("float_complex_124", [["3", "1+2j"]]) == [[3.0, 1 + 2j]]
    assert difftest.deserialize("all_to_tuples", [[[1, [2, 3]]]]) == [((1, (2, 3)),)]
    assert difftest.deserialize("dict_values_to_tuples", [[{"a": [1, 2]}, 3]]) == [[{"a": (1, 2)}, 3]]
    assert difftest.deserialize("args_to_nested_tuples", [[[[1, 2]], [[3]]]]) == [[((1, 2),), ((3,),)]]


def test_outputs_are_compared_as_evalplus_does() -> None:
    m = difftest.matches
    assert m(0.1 + 0.2, 0.3, [], None, 0) and not m(0.31, 0.3, [], None, 0)  # floats: atol 1e-6 by default
    assert m([1.0, 2.0000001], [1.0, 2.0], [], None, 0) and not m([1.0], [1.0, 2.0], [], None, 0)
    assert m(1.05, 1.0, [], None, 0.1) and not m(2, 1, [], None, 0) and not m("1", 1, [], None, 1e-6)
    assert m(float("nan"), float("nan"), [], None, 0)
    assert m(-1.0, 1.0, [[-1, 0, 1]], "root", 1e-6) and not m(0.0, 1.0, [[-1, 0, 1]], "root", 1e-6)
    assert not m("x", 1.0, [[-1, 0, 1]], "root", 1e-6)
    assert m("anything", True, [], "always", 0)
    assert m("a match object", True, [], "not_none", 0) and not m(None, True, [], "not_none", 0)
    assert m(0, 5, [], "or_zero", 0) and not m(1, 5, [], "or_zero", 0)


def _prepared(solution: str, reference: str, groups: dict[str, list[Any]], min_limit: float = 1.0) -> dict[str, Any]:
    difftest.prepare(reference, "f", json.dumps(groups), None, None, 0.0, min_limit, 4.0)
    namespace: dict[str, Any] = {}
    exec(compile(solution, "<solution>", "exec"), namespace)
    return namespace


def test_verdict_prints_what_the_model_needs(capsys: pytest.CaptureFixture[str]) -> None:
    ref = "def f(x):\n    return 1 / x if x else None\n"
    ns = _prepared("def f(x):\n    return 1 / x\n", ref, {"base": [[2]], "plus": [[0]]})
    assert difftest.verdict(ns, "f", "base", "N") == "N"
    assert difftest.verdict(ns, "f", "plus", "N") is None
    shown = capsys.readouterr().out
    assert shown.startswith("Input: [0]\nTraceback") and "ZeroDivisionError" in shown
    assert 'File "<solution>", line 2, in f' in shown and "difftest" not in shown  # the model's frames only

    ns = _prepared("def f(x):\n    return x\n", "def f(x):\n    return -x\n", {"base": [[3]], "plus": []})
    assert difftest.verdict(ns, "f", "base", "N") is None
    expected = "The results aren't as expected.\nInput: [3]\nExpected Output: -3\nActual Output: 3\n"
    assert capsys.readouterr().out == expected
    assert difftest.verdict({}, "f", "base", "N") is None
    assert "name 'f' is not defined" in capsys.readouterr().out


def test_per_input_time_limit_holds_even_when_the_alarm_is_swallowed(capsys: pytest.CaptureFixture[str]) -> None:
    for body in ("    while True:\n        pass\n",
                 "    try:\n        while True:\n            pass\n    except BaseException:\n        return x\n"):
        ns = _prepared(f"def f(x):\n{body}", "def f(x):\n    return x\n", {"base": [[1]], "plus": []}, 0.2)
        assert difftest.verdict(ns, "f", "base", "N") is None
        assert capsys.readouterr().out.startswith("Execution timed out after 0.20 s.\nInput: [1]")


def attempts(*passes: bool | tuple[bool, bool]) -> list[Attempt]:
    """True/False: a problem without plus tests; (base, all): with them."""
    out = []
    for i, p in enumerate(passes):
        base, full = p if isinstance(p, tuple) else (p, p)
        out.append(Attempt(f"r{i}", f"s{i}", full, None if full else f"fb{i}", base if isinstance(p, tuple) else None))
    return out


def test_base_and_plus_columns_come_from_one_track() -> None:
    late_plus = TaskResult("A", attempts((True, False), (True, True)), "passed")
    never = TaskResult("B", attempts((False, False), (True, False)), "rounds")
    assert pass_counts([late_plus, never], 1, base=True) == [1, 2]
    assert pass_counts([late_plus, never], 1) == [0, 1]
    assert [solution_at(late_plus, k, base=True) for k in (0, 1)] == ["s0", "s0"]  # base track stopped at 0
    assert [solution_at(late_plus, k) for k in (0, 1)] == ["s0", "s1"]


def test_cached_human_track_is_reused_only_for_the_same_critic() -> None:
    result = TaskResult("T", attempts(False, False, True), "passed", attempts(True), "passed", ["c0"], "gpt@x")
    assert pass_counts([result], 1, "human") == [0, 1] and pass_counts([result], 1) == [0, 0]
    same = result.usable_for(1, "gpt@x")
    assert same is not None and same.human is not None and same.critiques == ["c0"]
    other = result.usable_for(1, "other@y")
    assert other is not None and other.human is None  # execution track kept, human track to be run again
    assert result.usable_for(1) is not None and result.usable_for(3, "gpt@x") is not None
    short = TaskResult("T", attempts(False, False), "rounds", attempts(False), "rounds", ["c0"], "gpt@x")
    assert short.usable_for(2, "gpt@x") is None
    roundtrip = TaskResult.from_json(json.loads(result.to_json("k")))
    assert roundtrip == result


def test_seed_row_beside_the_measured_one() -> None:
    measured = {"no_feedback": {"base": 70.0, "plus": None}, "execution_feedback": {"base": 80.0, "plus": None}}
    got = compare(measured, "m-a-p/OpenCodeInterpreter-DS-6.7B", "humaneval")  # type: ignore[arg-type]
    assert got is not None and got["source"].endswith("fd95eb7d8a32dbc96dcff9322bbc288784f8d16e")
    assert got["rows"]["no_feedback"] == {"published": {"base": 76.2, "plus": 72.0},
                                         "measured": {"base": 70.0, "plus": None},
                                         "difference": {"base": -6.2, "plus": None}}
    assert got["rows"]["human_feedback"]["measured"] is None
    assert compare(measured, "some/other-model", "humaneval") is None  # type: ignore[arg-type]


def test_plain_humaneval_report_shows_the_seed_row_with_base_only(tmp_path: Path) -> None:
    from bot.evaluation.problems import Problem
    from bot.evaluation.report import table, write_outputs

    problems = [Problem(f"HumanEval/{i}", "def f():\n", "f", "def check(c): pass") for i in range(4)]
    results = {p.task_id: TaskResult(p.task_id, attempts(True), "passed") for p in problems[:3]}
    results["HumanEval/3"] = TaskResult("HumanEval/3", attempts(False, False), "rounds")
    meta = {"benchmark": "humaneval", "suite": "humaneval", "model": "m-a-p/OpenCodeInterpreter-DS-6.7B",
            "model_requests": 5, "cached": 0, "elapsed_s": 1.0}
    report = write_outputs(tmp_path, problems, results, 1, meta)
    assert report["plus"] is False and report["passed"] == [3, 3] and "passed_plus" not in report
    assert report["rows"]["execution_feedback"] == {"base": 75.0, "plus": None}
    text = table(report)
    assert "seed README, OpenCodeInterpreter-DS-6.7B on humaneval" in text
    assert "+ execution feedback              81.1 (78.7)     75.0            -6.1" in text
    assert "+ synth. human feedback           87.2 (86.6)     -               -" in text
    assert not (tmp_path / "samples_base_round0.jsonl").exists()


def test_long_inputs_are_cut_in_the_middle(capsys: pytest.CaptureFixture[str]) -> None:
    ns = _prepared("def f(xs):\n    return 0\n", "def f(xs):\n    return sum(xs)\n",
                   {"base": [[list(range(100_000))]], "plus": []})
    assert difftest.verdict(ns, "f", "base", "N") is None
    printed = capsys.readouterr().out
    assert len(printed) < 2500 and "characters cut]" in printed and printed.endswith("Actual Output: 0\n")
