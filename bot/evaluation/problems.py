"""The problem, the prompt the model sees, and turning its reply into a checkable solution."""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from bot.llm.base import ChatMessage

Suite = Literal["humaneval", "mbpp"]

# OpenCodeInterpreter's multi-turn instructions, character for character (trailing spaces
# included), from evaluation/evaluate/multi_turn/gen_plus_solution_multiround.py at commit
# e1d553c0426d671522a6f8d289ecbf456ab55609 of OpenCodeInterpreter/OpenCodeInterpreter (cited in
# docs/EVAL.md). They were sent as one user turn with no system message, so the chat template adds
# the model's own default system prompt exactly as in their runs.
HUMANEVAL_INSTRUCTION = (
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable "
    "responses to user instructions.\n\n"
    "@@ Instruction\n"
    "Here is the given code to do completion:\n"
    "```python\n{prompt}\n```\n"
    "Please continue to complete the function with python programming language. You are not allowed to modify "
    "the given code and do the completion only. \n\n"
    "Please return all completed codes in one code block. \n"
    "This code block should be in the following format:\n"
    "```python\n# Your codes here\n```\n\n"
    "@@ Response"
)
# The MBPP one takes EvalPlus's MBPP prompt (the task's text and its first test in a docstring) as is.
MBPP_INSTRUCTION = (
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable "
    "responses to user instructions.\n\n"
    "@@ Instruction\n"
    "Here is the given problem and test examples:\n"
    "{prompt}\n\n"
    "Please use the python programming language to solve this problem.\n"
    "Please make sure that your code includes the functions from the test samples and that the input and "
    "output formats of these functions match the test samples.\n\n"
    "Please return all completed codes in one code block. \n"
    "This code block should be in the following format:\n"
    "```python\n# Your codes here\n```\n\n"
    "@@ Response"
)


@dataclass(frozen=True)
class PlusTests:
    """EvalPlus's tests: inputs whose expected outputs come from running ``reference`` on them."""

    base_input: list[Any]
    plus_input: list[Any]
    atol: float
    #: prompt + canonical_solution, as EvalPlus runs it to compute the expected outputs
    reference: str
    #: how MBPP+ inputs are turned back into tuples/sets (difftest.MBPP_RECIPES); None for none
    recipe: str | None = None


@dataclass(frozen=True)
class Problem:
    task_id: str
    #: HumanEval: the code to complete; MBPP: EvalPlus's docstring with the text and first test
    prompt: str
    entry_point: str
    #: HumanEval: ``def check(candidate)``; MBPP: setup code and assertions; EvalPlus sets: unused
    test: str
    canonical_solution: str | None = None
    suite: Suite = "humaneval"
    plus: PlusTests | None = field(default=None, compare=False)

    @cached_property
    def digest(self) -> str:
        """Identifies the problem's content, so a cache entry for an edited problem is not reused."""
        plus = None if self.plus is None else [self.plus.base_input, self.plus.plus_input, self.plus.atol,
                                                self.plus.reference, self.plus.recipe]
        raw = json.dumps([self.task_id, self.prompt, self.entry_point, self.test, self.suite, plus], default=repr)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def instruction(problem: Problem) -> str:
    if problem.suite == "mbpp":
        return MBPP_INSTRUCTION.format(prompt=problem.prompt)
    return HUMANEVAL_INSTRUCTION.format(prompt=problem.prompt.strip())


def first_messages(problem: Problem, system_prompt: str | None) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": instruction(problem)})
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

    MBPP: the code as written (the prompt is prose). HumanEval: a reply that defines the entry
    point is used whole, after the prompt's preamble; otherwise it is taken as the function body
    and appended to the prompt (re-indented if it came flush left).
    """
    if problem.suite == "mbpp":
        return code.rstrip() + "\n"
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
    """A single-cell check (HumanEval's ``check`` or MBPP's assertions) whose last line evaluates
    to a nonce the solution cannot know, so exiting early or swallowing errors cannot pass for a pass."""
    if problem.suite == "mbpp":
        return f"{solution}\n\n{problem.test}\n\n{nonce!r}\n"
    return f"{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n{nonce!r}\n"
