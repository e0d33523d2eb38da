"""``codeloop eval humaneval`` end to end: scripted model, real sandboxes, exact pass counts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.core.settings import Settings
from bot.evaluation import cli
from bot.evaluation.checker import CheckPool
from bot.evaluation.problems import Problem
from bot.evaluation.report import table
from bot.llm import make_client
from runner.manager import SandboxManager
from tests.evaluation.conftest import PROBLEMS, feedback_turns, fenced, parse_args, task_of
from tests.runner.conftest import IMAGE

pytestmark = [pytest.mark.docker]

WRONG_BODY = "    print('x' * 5000)  # floods the output: the feedback must be cut\n    return None\n"
LOOP_BODY = "    while True:\n        pass\n"


def full(p: Problem) -> str:
    return fenced(p.prompt + (p.canonical_solution or ""))


def body(p: Problem) -> str:
    return fenced(p.canonical_solution or "")


class Script:
    """Per task (by index in HumanEval): when it starts passing, and what the feedback must say.

    0, 1: right away (whole function); 2: right away (body only); 3: after one round, once it saw
    the failed assertion; 4: after one round, once it saw the timeout; 5: after two rounds; 6: never;
    7: never, answering in prose without code (which ends its conversation, as in chat).
    """

    def __init__(self) -> None:
        self.seen: dict[str, list[list[str]]] = {}

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        p = task_of(messages)
        index = PROBLEMS.index(p)
        turns = feedback_turns(messages)
        self.seen.setdefault(p.task_id, []).append(turns)
        for turn in turns:
            assert turn.startswith("Execution result:\n"), turn
        if index in (0, 1):
            return full(p)
        if index == 2:
            return body(p)
        if index == 3:
            return full(p) if turns and "AssertionError" in turns[-1] else fenced("    return None\n")
        if index == 4:
            return full(p) if turns and "Timed out" in turns[-1] else fenced(p.prompt + LOOP_BODY)
        if index == 5:
            return full(p) if len(turns) >= 2 else fenced(WRONG_BODY)
        if index == 7:
            return "I am not able to complete this function."
        return fenced(WRONG_BODY)


async def run_eval(settings: Settings, manager: SandboxManager, out: Path, *argv: str) -> dict[str, Any]:
    args = parse_args("--out", str(out), "--timeout", "3", *argv)
    problems = PROBLEMS[: args.limit]
    client = make_client(settings)
    try:
        return await cli.evaluate(settings, problems, args, out, manager, client)
    finally:
        await client.aclose()


async def test_pass_counts_per_round_and_feedback(eval_settings: Callable[..., Settings], model_server: Any,
                                                  eval_manager: SandboxManager, out_dir: Path) -> None:
    script = Script()
    model_server.script = script
    report = await run_eval(eval_settings(), eval_manager, out_dir, "--rounds", "2", "--limit", "8")

    assert report["passed"] == [3, 5, 6]
    assert report["pass@1"] == [37.5, 62.5, 75.0]
    assert report["failed"] == ["HumanEval/6", "HumanEval/7"]
    per_task = report["per_task"]
    assert [per_task[f"HumanEval/{i}"]["first_pass"] for i in range(8)] == [0, 0, 0, 1, 1, 2, None, None]
    assert report["no_code"] == ["HumanEval/7"] and per_task["HumanEval/7"]["attempts"] == 1
    # 3 + 2*2 + 3 + 3 + 1 replies: a task stops at its pass or a reply without code, else after 2 rounds
    assert report["model_requests"] == len(model_server.requests) == 14
    assert all(r["temperature"] == 0 and r["max_tokens"] == 1024 for r in model_server.requests)  # greedy
    assert all(r["messages"][0]["role"] == "user" for r in model_server.requests)  # no system prompt: as OCI

    # The feedback is what chat shows, cut head + tail: the failing assertion or the timeout.
    last = script.seen["HumanEval/6"][-1]
    assert len(last) == 2 and all(len(turn) < 420 and "characters cut" in turn for turn in last)
    assert "Timed out" in script.seen["HumanEval/4"][-1][-1]
    assert "Error" in per_task["HumanEval/6"]["last_feedback"]

    # EvalPlus samples: one line per task per round; a task keeps its passing solution afterwards.
    for k in range(3):
        rows = [json.loads(line) for line in (out_dir / f"samples_round{k}.jsonl").read_text().splitlines()]
        assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(8)]
        assert ("while True" in rows[4]["solution"]) == (k == 0)
        assert ("return None" in rows[5]["solution"]) == (k < 2)
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["passed"] == [3, 5, 6]
    text = table(saved)
    assert "humaneval: 8 tasks" in text and "6/8" in text and "75.0%" in text


async def test_resume_from_cache(eval_settings: Callable[..., Settings], model_server: Any,
                                 eval_manager: SandboxManager, out_dir: Path) -> None:
    model_server.script = Script()
    settings = eval_settings()
    first = await run_eval(settings, eval_manager, out_dir, "--rounds", "2", "--limit", "4")  # "interrupted"
    assert first["passed"] == [3, 4, 4] and len(model_server.requests) == 5
    with (out_dir / "cache.jsonl").open("a") as fh:
        fh.write('{"key": "torn by a kill mid-wri')

    model_server.requests.clear()
    resumed = await run_eval(settings, eval_manager, out_dir, "--rounds", "2", "--limit", "8")
    assert resumed["passed"] == [3, 5, 6] and resumed["cached"] == 4
    assert {task_of(r["messages"]).task_id for r in model_server.requests} == {f"HumanEval/{i}" for i in range(4, 8)}

    model_server.requests.clear()
    fewer = await run_eval(settings, eval_manager, out_dir, "--rounds", "1", "--limit", "8")
    assert fewer["passed"] == [3, 5] and model_server.requests == []  # every task answerable from cache

    more = await run_eval(settings, eval_manager, out_dir, "--rounds", "3", "--limit", "8")
    # only task 6 (fails, has 3 replies) lacks a 4th: it alone is asked again, from the start;
    # task 7 ended itself with a reply without code, so more rounds would not change it
    assert more["passed"] == [3, 5, 6, 6] and len(model_server.requests) == 4
    assert {task_of(r["messages"]).task_id for r in model_server.requests} == {"HumanEval/6"}

    model_server.requests.clear()
    other = await run_eval(eval_settings(max_new_tokens=64), eval_manager, out_dir, "--rounds", "1", "--limit", "2")
    assert other["cached"] == 0 and len(model_server.requests) == 2  # other generation settings: no reuse


async def test_all_canonical_solutions_pass(eval_settings: Callable[..., Settings], model_server: Any,
                                            eval_manager: SandboxManager, out_dir: Path) -> None:
    model_server.script = lambda messages: full(task_of(messages))
    started = time.monotonic()
    report = await run_eval(eval_settings(), eval_manager, out_dir, "--concurrency", "16", "--sandboxes", "3")
    elapsed = time.monotonic() - started
    assert report["passed"] == [164, 164], report["failed"]
    assert elapsed < 60, f"164 canonical checks took {elapsed:.1f} s"


async def test_checks_are_isolated(eval_manager: SandboxManager) -> None:
    """One session, two checks: nothing the first leaves (files, globals, builtins, processes) is
    visible to the second."""
    pool = CheckPool(eval_manager, 1, timeout_s=5)
    await pool.start()
    try:
        polluter = (
            "import builtins, subprocess\n"
            "open('/tmp/leak', 'w').write('x'); open('/mnt/data/leak', 'w').write('x')\n"
            "builtins.leaked = 1\nLEAK = 1\n"
            "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
            "'done'\n"
        )
        first = await pool.check(polluter)
        assert first.ok and first.results[-1].text == "'done'", first
        probe = (
            "import builtins, os\n"
            "procs = [open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()]\n"
            "print(os.path.exists('/tmp/leak'), os.path.exists('/mnt/data/leak'),"
            " hasattr(builtins, 'leaked'), 'LEAK' in globals(), any(c.startswith(b'sleep') for c in procs))\n"
        )
        second = await pool.check(probe)
        assert second.ok, second
        assert second.stdout.strip() == "False False False False False"
    finally:
        await pool.aclose()


async def test_cli_with_data_file(eval_settings: Callable[..., Settings], model_server: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--data`` with MBPP-style problems, through the command's own entry point; no container stays."""
    import docker

    rows = [
        {"task_id": "Mini/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
         "canonical_solution": "    return a + b\n"},
        {"task_id": "Mini/1", "prompt": "def neg(a):\n    \"\"\"Minus a.\"\"\"\n", "entry_point": "neg",
         "test": "def check(candidate):\n    assert candidate(2) == -2\n"},
    ]
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Mini/0 answered right; Mini/1 answered with its body flush left, which is re-indented, but wrong.
    model_server.script = lambda m: fenced("return a + b" if "add" in m[0]["content"] else "return a")
    monkeypatch.setenv("CODELOOP_LLM_URL", model_server.url)
    monkeypatch.setenv("CODELOOP_SANDBOX_MEMORY", "256m")
    monkeypatch.setenv("CODELOOP_SANDBOX_IMAGE", IMAGE)
    before = {c.id for c in docker.from_env().containers.list(all=True)}

    out = tmp_path / "out"
    code = await cli._main(parse_args("--data", str(data), "--out", str(out), "--rounds", "1"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "mini: 2 tasks" in printed and "1/2" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] == [1, 1] and report["benchmark"] == "mini"
    samples = [json.loads(line) for line in (out / "samples_round1.jsonl").read_text().splitlines()]
    assert samples[1]["solution"].endswith("    return a\n")
    after = docker.from_env().containers.list(all=True, filters={"label": "codeloop.session=1"})
    assert not [c for c in after if c.id not in before and c.labels.get("codeloop.label", "").startswith("eval-")]
