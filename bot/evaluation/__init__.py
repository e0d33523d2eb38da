"""``codeloop eval``: pass@1 of the configured model with feedback, through the sandbox, beside the seed's table.

datasets.py   reads HumanEval, HumanEval+, MBPP (original, sanitized) and MBPP+ files
problems.py   the problem, OpenCodeInterpreter's instructions, replies turned into solutions
difftest.py   EvalPlus-style differential testing; runs inside the sandbox
grading.py    one solution's base (and plus) verdict in a fresh kernel
checker.py    a small pool of sandbox sessions, each check isolated
critic.py     synthesized human feedback from a second OpenAI-compatible model
solve.py      the per-task tracks (reply -> check -> feedback -> revise), concurrency, cache
published.py  the seed README's table
report.py     pass counts per round, the seed's row beside the measured one, report.json, samples
cli.py        ``codeloop eval humaneval|mbpp``
"""
