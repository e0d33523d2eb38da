"""HumanEval+ and the synthesized-human-feedback row, end to end: scripted model and critic, real sandboxes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.core.settings import Settings
from bot.evaluation import cli
from bot.evaluation.critic import SYSTEM
from bot.evaluation.datasets import load_problems
from bot.evaluation.report import table
from bot.llm import make_client
from runner.manager import SandboxManager
from tests.evaluation.conftest import feedback_turns, fenced, parse_args
from tests.evaluation.test_mbpp import PLUS_ROWS, task_text, write_jsonl
from tests.fakes.model_server import ScriptedModelServer

pytestmark = [pytest.mark.docker]

POLY = ("import math\n\n\ndef poly(xs: list, x: float):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n"
        "\n\n")
BISECT = ("    lo, hi = {lo}, {hi}\n    for _ in range(200):\n        mid = (lo + hi) / 2\n"
          "        if (poly(xs, lo) > 0) == (poly(xs, mid) > 0):\n            lo = mid\n        else:\n"
          "            hi = mid\n    return lo\n")
HUMANEVAL_PLUS_ROWS = [
    {"task_id": "HumanEval/42", "entry_point": "incr_list", "atol": 0,
     "prompt": 'def incr_list(l: list):\n    """Return list with elements incremented by 1."""\n',
     "canonical_solution": "    return [x + 1 for x in l]\n",
     "test": "def check(candidate):\n    assert candidate([1]) == [2]\n",
     "base_input": [[[1, 2, 3]]], "plus_input": [[[]], [[-1, 10**6]]]},
    # Two roots each: the reference finds the positive one, the revised answer the negative one;
    # EvalPlus's find_zero oracle accepts any root.
    {"task_id": "HumanEval/32", "entry_point": "find_zero", "atol": 1e-6,
     "prompt": POLY + 'def find_zero(xs: list):\n    """A zero of the polynomial xs."""\n',
     "canonical_solution": BISECT.format(lo=0.0, hi=10.0),
     "test": "def check(candidate):\n    pass\n",
     "base_input": [[[-1, 0, 1, 0]]], "plus_input": [[[-4, 0, 1, 0]]]},
    {"task_id": "HumanEval/99", "entry_point": "is_sorted", "atol": 0,
     "prompt": 'def is_sorted(xs: list) -> bool:\n    """True if xs is sorted ascending."""\n',
     "canonical_solution": "    return all(a <= b for a, b in zip(xs, xs[1:]))\n",
     "test": "def check(candidate):\n    assert candidate([1, 2])\n",
     "base_input": [[[1, 2, 3]], [[3, 1]]], "plus_input": [[[1, 1, 2]]]},
]


def humaneval_plus_script(messages: list[dict[str, Any]]) -> str:
    prompt, turns = messages[0]["content"], feedback_turns(messages)
    if "def incr_list" in prompt:  # the body only: appended to the prompt
        return fenced("    return [x + 1 for x in l]")
    if "def find_zero" in prompt:
        if turns and "The results aren't as expected." in turns[-1]:
            return fenced(POLY + "def find_zero(xs: list):\n" + BISECT.format(lo=-10.0, hi=0.0))
        return fenced("def find_zero(xs: list):\n    return 0.0")
    return fenced("def is_sorted(xs: list) -> bool:\n    return all(a < b for a, b in zip(xs, xs[1:]))")


async def run(settings: Settings, manager: SandboxManager, benchmark: str, data: Path, out: Path,
              *argv: str) -> dict[str, Any]:
    args = parse_args("--data", str(data), "--out", str(out), "--timeout", "5", *argv, benchmark=benchmark)
    problems = load_problems(benchmark, args.data)  # type: ignore[arg-type]
    client = make_client(settings)
    try:
        return await cli.evaluate(settings, problems, args, out, manager, client)
    finally:
        await client.aclose()


async def test_humaneval_plus_base_and_plus(eval_settings: Callable[..., Settings], model_server: Any,
                                            eval_manager: SandboxManager, tmp_path: Path) -> None:
    model_server.script = humaneval_plus_script
    data = write_jsonl(tmp_path / "HumanEvalPlus-v0.1.10.jsonl", HUMANEVAL_PLUS_ROWS)
    out = tmp_path / "out"
    report = await run(eval_settings(model="m-a-p/OpenCodeInterpreter-DS-33B"), eval_manager, "humaneval", data,
                       out, "--rounds", "1")

    assert report["benchmark"] == "HumanEvalPlus-v0.1.10" and report["plus"] is True
    assert report["passed"] == [2, 3] and report["passed_plus"] == [1, 2]
    per_task = report["per_task"]
    assert [per_task[t]["first_pass"] for t in ("HumanEval/42", "HumanEval/32", "HumanEval/99")] == [0, 1, None]
    assert per_task["HumanEval/99"]["first_base_pass"] == 0
    shown = per_task["HumanEval/99"]["last_feedback"]
    assert "Input: [[1, 1, 2]]\nExpected Output: True\nActual Output: False" in shown
    assert report["model_requests"] == len(model_server.requests) == 5
    samples = [json.loads(line) for line in (out / "samples_round1.jsonl").read_text().splitlines()]
    assert samples[0]["solution"].startswith("def incr_list(l: list):")  # a self-contained program
    rows = report["published"]["rows"]
    assert rows["no_feedback"]["published"] == {"base": 79.3, "plus": 74.3}
    assert rows["no_feedback"]["measured"] == {"base": 66.67, "plus": 33.33}


@pytest.fixture
async def critic_server() -> AsyncIterator[ScriptedModelServer]:
    server = await ScriptedModelServer().start()
    yield server
    await server.stop()


CRITIQUE = "The magnitude of a negative number is its negation; handle x < 0 before returning."


def feedback_model(messages: list[dict[str, Any]]) -> str:
    """Learns from the critique, never from the execution result alone."""
    text, turns = task_text(messages), feedback_turns(messages)
    if "add two" in text:
        return fenced("def add(a, b):\n    return a + b")
    if turns and "negation" in turns[-1]:
        return fenced("def magnitude(x):\n    return -x if x < 0 else x")
    return fenced("def magnitude(x):\n    return x")


async def test_synthesized_human_feedback_row(eval_settings: Callable[..., Settings], model_server: Any,
                                              critic_server: ScriptedModelServer, eval_manager: SandboxManager,
                                              tmp_path: Path) -> None:
    model_server.script = feedback_model
    critic_server.script = [CRITIQUE]
    data = write_jsonl(tmp_path / "MbppPlus.jsonl", PLUS_ROWS[:2])
    out = tmp_path / "out"
    settings = eval_settings(model="m-a-p/OpenCodeInterpreter-DS-6.7B", eval_critic_token="sk-critic")
    hf = ("--human-feedback-url", critic_server.url + "/v1", "--human-feedback-model", "critic-70b")
    report = await run(settings, eval_manager, "mbpp", data, out, "--rounds", "1", *hf)

    # The critic saw the seed's prompt: the problem, the code and what the sandbox printed.
    assert len(critic_server.requests) == report["critic_requests"] == 1
    sent = critic_server.requests[0]
    assert sent["model"] == "critic-70b" and sent["temperature"] == 0 and sent["max_tokens"] == 1024
    assert critic_server.authorization == ["Bearer sk-critic"]
    system, user = sent["messages"]
    assert system == {"role": "system", "content": SYSTEM}
    assert user["content"].startswith("You are tasked with providing guidance to a programmer")
    assert ('@@Problem\n"""\nWrite a function to return the magnitude of a number.\nassert magnitude(3) == 3\n"""'
            "\n\n@@Existing Code\ndef magnitude(x):\n    return x\n\n\n@@Execution Result\n"
            "The results aren't as expected.\nInput: [-3]\nExpected Output: 3\nActual Output: -3") in user["content"]
    assert user["content"].endswith("\n\n@@Guidance\n") and "@@Canonical Solution" not in user["content"]

    # The critique reached the model, after the execution result, in the human-feedback track only.
    revisions = [r["messages"] for r in model_server.requests if len(r["messages"]) == 3]
    turns = sorted(m[2]["content"] for m in revisions)
    assert len(turns) == 2 and turns[0].startswith("Execution result:\nThe results aren't as expected.")
    assert turns[1] == turns[0] + "\n\n" + CRITIQUE
    assert report["passed_plus"] == [1, 1] and report["human_feedback"]["passed_plus"] == [1, 2]
    assert report["human_feedback"]["passed"] == [2, 2]
    assert report["per_task"]["Mbpp/102"]["critiques"] == [CRITIQUE]
    hf_row = report["published"]["rows"]["human_feedback"]
    assert hf_row["published"] == {"base": 86.2, "plus": 74.2}
    assert hf_row["measured"] == {"base": 100.0, "plus": 100.0} and hf_row["difference"] == {"base": 13.8, "plus": 25.8}
    text = table(report)
    assert "synth. human feedback:" in text and "+ synth. human feedback" in text and "86.2 (74.2)" in text
    assert (out / "samples_hf_round1.jsonl").exists() and (out / "samples_hf_base_round1.jsonl").exists()

    # Rerun: everything from the cache, neither server asked.
    model_server.requests.clear()
    critic_server.requests.clear()
    again = await run(settings, eval_manager, "mbpp", data, out, "--rounds", "1", *hf)
    assert again["cached"] == 2 and model_server.requests == [] and critic_server.requests == []
    assert again["human_feedback"]["passed_plus"] == [1, 2]

    # The Oracle variant, revising from the critique alone as the seed's script did: the execution
    # track and round 0 come from the cache; only the human track's revision is asked again.
    oracle = await run(settings, eval_manager, "mbpp", data, out, "--rounds", "1", *hf,
                       "--human-feedback-oracle", "--critique-only")
    assert len(model_server.requests) == 1 and len(critic_server.requests) == 1
    assert "@@Canonical Solution\ndef magnitude(x):\n    return abs(x)\n" in \
        critic_server.requests[0]["messages"][1]["content"]
    assert model_server.requests[0]["messages"][-1] == {"role": "user", "content": CRITIQUE}
    assert oracle["human_feedback"]["passed_plus"] == [1, 2]
    assert oracle["published"]["rows"]["human_feedback_oracle"]["published"] == {"base": 87.2, "plus": 75.2}
    assert oracle["published"]["rows"]["human_feedback"]["measured"] is None


async def test_cli_mbpp_with_critic_from_the_environment(model_server: Any, critic_server: ScriptedModelServer,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``codeloop eval mbpp`` through the command's own entry point: the critic's key comes from
    CODELOOP_EVAL_CRITIC_TOKEN, the table prints both rows, and no container stays behind."""
    import docker

    row = {"task_id": 11, "text": "Write a function to return the magnitude of a number.",
           "code": "def magnitude(x):\n    return abs(x)", "test_list": ["assert magnitude(-3) == 3"],
           "test_setup_code": "", "challenge_test_list": []}
    data = write_jsonl(tmp_path / "mbpp.jsonl", [row])
    model_server.script = feedback_model
    critic_server.script = [CRITIQUE]
    monkeypatch.setenv("CODELOOP_LLM_URL", model_server.url)
    monkeypatch.setenv("CODELOOP_SANDBOX_MEMORY", "256m")
    monkeypatch.setenv("CODELOOP_EVAL_CRITIC_TOKEN", "sk-from-env")
    before = {c.id for c in docker.from_env().containers.list(all=True)}

    out = tmp_path / "out"
    code = await cli._main(parse_args("--data", str(data), "--out", str(out), "--human-feedback-url",
                                      critic_server.url, benchmark="mbpp"))
    assert code == 0
    assert critic_server.authorization == ["Bearer sk-from-env"]
    assert critic_server.requests[0]["model"] == "gpt-4-1106-preview"  # the seed's GPT-4, by default
    printed = capsys.readouterr().out
    assert "mbpp: 1 tasks" in printed and "synth. human feedback:" in printed and "samples_hf_round" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] == [0, 0] and report["human_feedback"]["passed"] == [0, 1]
    after = docker.from_env().containers.list(all=True, filters={"label": "codeloop.session=1"})
    assert not [c for c in after if c.id not in before and c.labels.get("codeloop.label", "").startswith("eval-")]
