"""The seed's texts, verbatim: instructions, critic prompts and the README's table.

Each expected text below is copied from OpenCodeInterpreter/OpenCodeInterpreter (paths and commits
in docs/EVAL.md); ␠ marks a trailing space the seed's text has.
"""

from __future__ import annotations

import re

from bot.evaluation.critic import critic_messages
from bot.evaluation.problems import Problem, instruction
from bot.evaluation.published import PUBLISHED, published_model, published_rows

# evaluation/evaluate/multi_turn/gen_plus_solution_multiround.py @ e1d553c0426d671522a6f8d289ecbf456ab55609
SEED_HUMANEVAL = '''You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable responses to user instructions.

@@ Instruction
Here is the given code to do completion:
```{}
{}
```
Please continue to complete the function with {} programming language. You are not allowed to modify the given code and do the completion only.␠

Please return all completed codes in one code block.␠
This code block should be in the following format:
```{}
# Your codes here
```

@@ Response
'''.replace("␠", " ")  # noqa: E501

SEED_MBPP = '''You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable responses to user instructions.

@@ Instruction
Here is the given problem and test examples:
{}

Please use the {} programming language to solve this problem.
Please make sure that your code includes the functions from the test samples and that the input and output formats of these functions match the test samples.

Please return all completed codes in one code block.␠
This code block should be in the following format:
```{}
# Your codes here
```

@@ Response
'''.replace("␠", " ")  # noqa: E501

# evaluation/evaluate/multi_turn/gen_plus_solution_multiround_human_feedback.py, build_gpt_prompt
SEED_CRITIC = """You are tasked with providing guidance to a programmer who has drafted a code for a programming problem.␠
Your role is to mimic human-like responses and offer suggestions for modifying the code based on the observed execution results.
You should refrain from directly writing code.
Begin by thoroughly examining the existing code and its functionality.
Analyze the @@Execution Result obtained from running the @@Existing Code. Identify any errors, unexpected behavior, or deviations from the expected output.
Consider potential edge cases, optimization opportunities, or alternative approaches based on insights from the @@Execution Result.
Offer guidance in a clear and understandable manner, explaining the rationale behind each suggestion.
Refrain from providing actual code solutions, but instead focus on conceptual modifications or strategies.
Provide constructive feedback to help the programmer improve their coding skills.
Remember, your role is to simulate human-like guidance and expertise in programming without directly implementing solutions.
Please respond in no more than three sentences.

@@Problem
{}

@@Existing Code
{}

@@Execution Result
{}

@@Guidance
""".replace("␠", " ")  # noqa: E501

# ..._human_feedback_oracle.py, build_gpt_prompt
SEED_ORACLE = """You are tasked with providing guidance to a programmer who has drafted a code for a programming problem.␠
Your role is to mimic human-like responses and offer suggestions for modifying the code based on the canonical solution and the observed execution results.
You should NOT directly revealing contents of the @@Canonical Solution or mentioning terms such as "canonical solution."
You should refrain from directly writing code.
Begin by thoroughly examining the existing code and its functionality.
Compare the @@Existing Code with the @@Canonical Solution provided. Note any discrepancies in logic, approach, or implementation.
Analyze the @@Execution Result obtained from running the @@Existing Code. Identify any errors, unexpected behavior, or deviations from the expected output.
Consider potential edge cases, optimization opportunities, or alternative approaches based on insights from both the @@Canonical Solution and @@Execution Result.
Offer guidance in a clear and understandable manner, explaining the rationale behind each suggestion.
Refrain from providing actual code solutions, but instead focus on conceptual modifications or strategies.
Provide constructive feedback to help the programmer improve their coding skills.
Remember, your role is to simulate human-like guidance and expertise in programming without directly implementing solutions.
Please respond in no more than three sentences.

@@Problem
{}

@@Existing Code
{}

@@Execution Result
{}

@@Canonical Solution
{}

@@Guidance
""".replace("␠", " ")  # noqa: E501

# README.md @ fd95eb7d8a32dbc96dcff9322bbc288784f8d16e
SEED_TABLE = """
| **OpenCodeInterpreter-DS-1.3B** | 65.2 (61.0) | 63.4 (52.4) | 64.3 (56.7) |
| + Execution Feedback | 65.2 (62.2) | 65.2 (55.6) | 65.2 (58.9) |
| **OpenCodeInterpreter-DS-6.7B** | 76.2 (72.0) | 73.9 (63.7) | 75.1 (67.9) |
| + Execution Feedback | 81.1 (78.7) | 82.7 (72.4) | 81.9 (75.6) |
| + Synth. Human Feedback | 87.2 (86.6) | 86.2 (74.2) | 86.7 (80.4) |
| + Synth. Human Feedback (Oracle) | 89.7 (86.6) | 87.2 (75.2) | 88.5 (80.9) |
| **OpenCodeInterpreter-DS-33B** | 79.3 (74.3) | 78.7 (66.4) | 79.0 (70.4) |
| + Execution Feedback | 82.9 (80.5) | 83.5 (72.2) | 83.2 (76.4) |
| + Synth. Human Feedback | 88.4 (86.0) | 87.5 (75.9) | 88.0 (81.0) |
| + Synth. Human Feedback (Oracle) | 92.7 (89.7) | 90.5 (79.5) | 91.6 (84.6) |
| **OpenCodeInterpreter-CL-7B** | 72.6 (67.7) | 66.4 (55.4) | 69.5 (61.6) |
| + Execution Feedback | 75.6 (70.1) | 69.9 (60.7) | 72.8 (65.4) |
| **OpenCodeInterpreter-CL-13B** | 77.4 (73.8) | 70.7 (59.2) | 74.1 (66.5) |
| + Execution Feedback | 81.1 (76.8) | 78.2 (67.2) | 79.7 (72.0) |
| **OpenCodeInterpreter-CL-34B** | 78.0 (72.6) | 73.4 (61.4) | 75.7 (67.0) |
| + Execution Feedback | 81.7 (78.7) | 80.2 (67.9) | 81.0 (73.3) |
| **OpenCodeInterpreter-CL-70B** | 76.2 (70.7) | 73.0 (61.9) | 74.6 (66.3) |
| + Execution Feedback | 79.9 (77.4) | 81.5 (69.9) | 80.7 (73.7) |
| **OpenCodeInterpreter-GM-7B** | 56.1 (50.0) | 39.8 (34.6) | 48.0 (42.3) |
| + Execution Feedback | 64.0 (54.3) | 48.6 (40.9) | 56.3 (47.6) |
| **OpenCodeInterpreter-SC2-3B** | 65.2 (57.9) | 62.7 (52.9) | 64.0 (55.4) |
| + Execution Feedback | 67.1 (60.4) | 63.4 (54.9) | 65.3 (57.7) |
| **OpenCodeInterpreter-SC2-7B** | 73.8 (68.9) | 61.7 (51.1) | 67.8 (60.0) |
| + Execution Feedback | 75.6 (69.5) | 66.9 (55.4) | 71.3 (62.5) |
| **OpenCodeInterpreter-SC2-15B** | 75.6 (69.5) | 71.2 (61.2) | 73.4 (65.4) |
| + Execution Feedback | 77.4 (72.0) | 74.2 (63.4) | 75.8 (67.7) |
"""
ROWS = {"+ Execution Feedback": "execution_feedback", "+ Synth. Human Feedback": "human_feedback",
        "+ Synth. Human Feedback (Oracle)": "human_feedback_oracle"}


def test_instructions_are_the_seeds_to_the_character() -> None:
    he = Problem("T/0", "def f():\n    pass\n\n", "f", "")
    assert instruction(he) == SEED_HUMANEVAL.strip().format("python", he.prompt.strip(), "python", "python")
    mbpp_prompt = '"""\nWrite a function.\nassert f() == 1\n"""\n'
    mb = Problem("Mbpp/11", mbpp_prompt, "f", "assert f() == 1", suite="mbpp")
    assert instruction(mb) == SEED_MBPP.strip().format(mbpp_prompt, "python", "python")


def test_critic_prompts_are_the_seeds_to_the_character() -> None:
    plain = critic_messages("  the problem \n", "def f(): pass", "AssertionError")
    assert plain == [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": SEED_CRITIC.format("the problem", "def f(): pass", "AssertionError")}]
    oracle = critic_messages("p", "code", "result", canonical="    return 1\n")
    assert oracle[1]["content"] == SEED_ORACLE.format("p", "code", "result", "    return 1\n")


def test_published_table_is_the_readmes() -> None:
    parsed: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    model = ""
    for line in SEED_TABLE.strip().splitlines():
        name, he, mbpp, _ = (c.strip() for c in line.strip("|").split("|"))
        cells = {k: tuple(float(x) for x in re.findall(r"[\d.]+", v)) for k, v in (("humaneval", he), ("mbpp", mbpp))}
        if name.startswith("**"):
            model = name.strip("*")
            parsed[model] = {"no_feedback": cells}  # type: ignore[dict-item]
        else:
            parsed[model][ROWS[name]] = cells  # type: ignore[assignment]
    assert parsed == PUBLISHED
    assert published_model("m-a-p/OpenCodeInterpreter-DS-6.7B") == "OpenCodeInterpreter-DS-6.7B"
    assert published_model("/models/opencodeinterpreter-ds-33b/") == "OpenCodeInterpreter-DS-33B"
    assert published_model("deepseek-ai/deepseek-coder-6.7b-instruct") is None
    assert published_rows("m-a-p/OpenCodeInterpreter-DS-1.3B", "mbpp") == {
        "no_feedback": (63.4, 52.4), "execution_feedback": (65.2, 55.6)}
