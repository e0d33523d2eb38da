"""``codeloop eval mbpp`` end to end: hand-written MBPP and MBPP+ files, scripted model, real sandboxes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.core.settings import Settings
from bot.evaluation import cli
from bot.evaluation.datasets import load_problems
from bot.evaluation.report import table
from bot.llm import make_client
from runner.manager import SandboxManager
from tests.evaluation.conftest import feedback_turns, fenced, parse_args

pytestmark = [pytest.mark.docker]

# The original MBPP's shape. Task 2 is outside the test split (11-510) and is never asked.
MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to return one.", "code": "def one():\n    return 1",
     "test_list": ["assert one() == 1"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 11, "text": "Write a python function to remove the first and last occurrence of a given character.",
     "code": "def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)[::-1]",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to find the shared elements from the given two lists.",
     "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 13, "text": "Write a function to find the area of a circle.",
     "code": "import math\ndef circle_area(r):\n    return math.pi * r * r",
     "test_list": ["assert isclose(circle_area(2), 12.566, rel_tol=0.001)"],
     "test_setup_code": "from math import isclose", "challenge_test_list": ["assert circle_area(0) == 0"]},
    {"task_id": 14, "text": "Write a function to reverse a string.", "code": "def rev(s):\n    return s[::-1]",
     "test_list": ['assert rev("ab") == "ba"'], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 15, "text": "Write a function to double a number.", "code": "def dbl(x):\n    return 2 * x",
     "test_list": ["assert dbl(2) == 4"], "test_setup_code": "", "challenge_test_list": []},
]

# EvalPlus's MbppPlus shape: expected outputs come from the reference, in the sandbox.
PLUS_ROWS = [
    {"task_id": "Mbpp/101", "entry_point": "add", "atol": 0,
     "prompt": '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n',
     "canonical_solution": "def add(a, b):\n    return a + b\n",
     "base_input": [[1, 2]], "plus_input": [[-1, 1], [10**20, 1]]},
    {"task_id": "Mbpp/102", "entry_point": "magnitude", "atol": 0,
     "prompt": '"""\nWrite a function to return the magnitude of a number.\nassert magnitude(3) == 3\n"""\n',
     "canonical_solution": "def magnitude(x):\n    return abs(x)\n",
     "base_input": [[3], [0]], "plus_input": [[-3], [7]]},
    {"task_id": "Mbpp/103", "entry_point": "circle_area", "atol": 0,
     "prompt": '"""\nWrite a function to compute the area of a circle.\n'
               'assert circle_area(1) == 3.141592653589793\n"""\n',
     "canonical_solution": "import math\ndef circle_area(r):\n    return math.pi * r * r\n",
     "base_input": [[1], [2.5]], "plus_input": [[10]]},
    {"task_id": "Mbpp/104", "entry_point": "fib", "atol": 0,
     "prompt": '"""\nWrite a function for the n-th Fibonacci number.\nassert fib(10) == 55\n"""\n',
     "canonical_solution": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                           "    return a\n",
     "base_input": [[10]], "plus_input": [[20], [40]]},
    {"task_id": "Mbpp/105", "entry_point": "inverse", "atol": 0,
     "prompt": '"""\nWrite a function returning 1/x, or None for 0.\nassert inverse(2) == 0.5\n"""\n',
     "canonical_solution": "def inverse(x):\n    return None if x == 0 else 1 / x\n",
     "base_input": [[2]], "plus_input": [[4], [0]]},
    # Mbpp/106's second argument is a tuple; the file stores it as a JSON list, as MbppPlus does.
    {"task_id": "Mbpp/106", "entry_point": "add_lists", "atol": 0,
     "prompt": '"""\nWrite a function to append the given list to the given tuples.\n'
               'assert add_lists([5, 6, 7], (9, 10)) == (9, 10, 5, 6, 7)\n"""\n',
     "canonical_solution": "def add_lists(test_list, test_tup):\n    return test_tup + tuple(test_list)\n",
     "base_input": [[[5, 6, 7], [9, 10]]], "plus_input": [[[], [1]]]},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_text(messages: list[dict[str, Any]]) -> str:
    """The task's text line, read back from EvalPlus's docstring in the first user turn."""
    first = next(m for m in messages if m["role"] == "user")["content"]
    return first.split('"""\n', 1)[1].split("\n", 1)[0]


async def run_mbpp(settings: Settings, manager: SandboxManager, data: Path, out: Path, *argv: str) -> dict[str, Any]:
    args = parse_args("--data", str(data), "--out", str(out), "--timeout", "5", *argv, benchmark="mbpp")
    problems = load_problems("mbpp", args.data, args.all_tasks)[: args.limit]
    client = make_client(settings)
    try:
        return await cli.evaluate(settings, problems, args, out, manager, client)
    finally:
        await client.aclose()


def mbpp_script(messages: list[dict[str, Any]]) -> str:
    text, turns = task_text(messages), feedback_turns(messages)
    if text.startswith("Write a python function to remove"):  # right away
        return fenced("def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)[::-1]")
    if text.startswith("Write a function to find the shared"):  # after the failed assertion
        if turns and "AssertionError" in turns[-1] and "similar_elements" in turns[-1]:
            return fenced("def similar_elements(a, b):\n    return tuple(set(a) & set(b))")
        return fenced("def similar_elements(a, b):\n    return ()")
    if text.startswith("Write a function to find the area"):  # needs the task's test_setup_code
        return fenced("import math\n\ndef circle_area(r):\n    return math.pi * r ** 2")
    if text.startswith("Write a function to reverse"):  # never
        return fenced("def rev(s):\n    return s")
    return "Doubling is easy: multiply by two."  # no code: the conversation ends


async def test_mbpp_pass_counts_prompt_and_split(eval_settings: Callable[..., Settings], model_server: Any,
                                                 eval_manager: SandboxManager, tmp_path: Path) -> None:
    model_server.script = mbpp_script
    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    out = tmp_path / "out"
    report = await run_mbpp(eval_settings(), eval_manager, data, out, "--rounds", "2")

    assert report["tasks"] == 5 and report["plus"] is False and report["suite"] == "mbpp"
    assert report["passed"] == [2, 3, 3] and report["pass@1"] == [40.0, 60.0, 60.0]
    per_task = report["per_task"]
    assert [per_task[f"Mbpp/{i}"]["first_pass"] for i in range(11, 16)] == [0, 1, 0, None, None]
    assert report["no_code"] == ["Mbpp/15"] and report["failed"] == ["Mbpp/14", "Mbpp/15"]
    # 1 + 2 + 1 + 3 + 1 replies; task 2 (a prompt-split task) was never asked
    assert report["model_requests"] == len(model_server.requests) == 8
    first = model_server.requests[0]["messages"]
    assert len(first) == 1 and first[0]["role"] == "user"  # no system prompt, as OpenCodeInterpreter ran it
    asked = {task_text(r["messages"]) for r in model_server.requests}
    assert "Write a function to return one." not in asked

    # OpenCodeInterpreter's MBPP instruction around EvalPlus's prompt: the text and the first test shown
    by_text = {task_text(r["messages"]): r["messages"][0]["content"] for r in model_server.requests}
    prompt = by_text["Write a function to find the shared elements from the given two lists."]
    assert prompt.startswith("You are an exceptionally intelligent coding assistant")
    assert ('Here is the given problem and test examples:\n"""\nWrite a function to find the shared elements from '
            'the given two lists.\nassert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n\n\n'
            'Please use the python programming language to solve this problem.\n') in prompt
    assert prompt.endswith("# Your codes here\n```\n\n@@ Response")
    # the feedback is chat's: Execution result + the failed assertion's traceback
    revised = [r["messages"] for r in model_server.requests if len(r["messages"]) == 3]
    assert all(m[2]["content"].startswith("Execution result:\n") for m in revised)

    rows = [json.loads(line) for line in (out / "samples_round1.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [f"Mbpp/{i}" for i in range(11, 16)]
    assert "set(a) & set(b)" in rows[1]["solution"] and rows[4]["solution"] == ""
    assert not (out / "samples_base_round0.jsonl").exists()  # no plus tests, one column
    assert "mbpp: 5 tasks" in table(report) and "3/5" in table(report)


def plus_script(seen: dict[str, list[str]]) -> Callable[[list[dict[str, Any]]], str]:
    def script(messages: list[dict[str, Any]]) -> str:
        text, turns = task_text(messages), feedback_turns(messages)
        seen.setdefault(text, []).extend(turns[-1:])
        last = turns[-1] if turns else ""
        if "add two" in text:
            return fenced("def add(a, b):\n    return a + b")
        if "magnitude" in text:  # passes the base inputs, fails the plus input -3 until shown it
            if "Input: [-3]" in last and "The results aren't as expected." in last:
                return fenced("def magnitude(x):\n    return -x if x < 0 else x")
            return fenced("def magnitude(x):\n    return x")
        if "area of a circle" in text:  # not bit-equal to the reference: passes within EvalPlus's 1e-6
            return fenced("def circle_area(r):\n    return 3.14159265358979 * r * r")
        if "Fibonacci" in text:  # exponential: fine on the base input, times out on the plus input 40
            if "timed out" in last:
                return fenced("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                              "    return a")
            return fenced("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)")
        if "1/x" in text:  # raises on the plus input 0, and never learns
            return fenced("def inverse(x):\n    return 1 / x")
        return fenced("def add_lists(test_list, test_tup):\n    return test_tup + tuple(test_list)")

    return script


async def test_mbpp_plus_reports_base_and_plus(eval_settings: Callable[..., Settings], model_server: Any,
                                               eval_manager: SandboxManager, tmp_path: Path) -> None:
    seen: dict[str, list[str]] = {}
    model_server.script = plus_script(seen)
    data = write_jsonl(tmp_path / "MbppPlus.jsonl", PLUS_ROWS)
    out = tmp_path / "out"
    report = await run_mbpp(eval_settings(model="m-a-p/OpenCodeInterpreter-DS-6.7B"), eval_manager, data, out,
                            "--rounds", "1")

    assert report["plus"] is True and report["benchmark"] == "MbppPlus"
    # base: every task passes its base inputs at round 0; plus: add, circle_area, add_lists at 0;
    # magnitude and fib after one round; inverse never
    assert report["passed"] == [6, 6] and report["passed_plus"] == [3, 5]
    assert report["pass@1_plus"] == [50.0, 83.33]
    per_task = report["per_task"]
    assert per_task["Mbpp/102"]["first_base_pass"] == 0 and per_task["Mbpp/102"]["first_pass"] == 1
    assert per_task["Mbpp/105"]["first_pass"] is None and "Input: [0]" in per_task["Mbpp/105"]["last_feedback"]
    assert "ZeroDivisionError" in per_task["Mbpp/105"]["last_feedback"]
    fib = seen["Write a function for the n-th Fibonacci number."]
    assert "Execution timed out" in fib[0] and "Input: [40]" in fib[0]
    assert "Expected Output: 3\nActual Output: -3" in seen["Write a function to return the magnitude of a number."][0]
    assert report["model_requests"] == 6 + 3

    # the seed's row beside the measured one (DS-6.7B, MBPP (MBPP+))
    published = report["published"]
    assert published["model"] == "OpenCodeInterpreter-DS-6.7B" and published["benchmark"] == "mbpp"
    ef = published["rows"]["execution_feedback"]
    assert ef["published"] == {"base": 82.7, "plus": 72.4}
    assert ef["measured"] == {"base": 100.0, "plus": 83.33} and ef["difference"] == {"base": 17.3, "plus": 10.93}
    assert published["rows"]["human_feedback"]["measured"] is None  # no critic this run
    text = table(report)
    assert "+ execution feedback" in text and "82.7 (72.4)" in text and "100.0 (83.3)" in text

    # base-column samples stop at the first base pass; the plus track's move on
    base0 = [json.loads(line) for line in (out / "samples_base_round1.jsonl").read_text().splitlines()]
    plus1 = [json.loads(line) for line in (out / "samples_round1.jsonl").read_text().splitlines()]
    assert "return x\n" in base0[1]["solution"] and "-x if x < 0" in plus1[1]["solution"]
