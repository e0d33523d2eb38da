from __future__ import annotations

import pytest

from bot.agent.code import calls_input, last_python_block


def test_last_python_block_is_the_one_run() -> None:
    reply = "First:\n```python\nx = 1\n```\nthen\n```python\nprint(x + 1)\n```\nDone."
    assert last_python_block(reply) == "print(x + 1)"


def test_tagged_block_wins_over_later_untagged_output() -> None:
    reply = "```python\nprint(2)\n```\nIt prints:\n```\n2\n```"
    assert last_python_block(reply) == "print(2)"


def test_untagged_block_used_when_alone_and_no_block_means_none() -> None:
    assert last_python_block("```\nprint(3)\n```") == "print(3)"
    assert last_python_block("The answer is 42.") is None
    assert last_python_block("```python\n\n```") is None


@pytest.mark.parametrize(("code", "expected"), [
    ("name = input('name? ')", True),
    ("x = int(input())", True),
    ("s = 'input(' # input()", False),
    ("parser.input(3)", False),
    ("def input(): pass", False),
    ("print(input_data)", False),
    ("x = input(\n", True),  # unparsable code falls back to the regex
])
def test_calls_input(code: str, expected: bool) -> None:
    assert calls_input(code) is expected
