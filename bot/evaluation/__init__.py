"""``codeloop eval``: pass@1 of the configured model, with execution feedback, through the sandbox.

problems.py  loads the problem set and turns replies into solutions and check programs
checker.py   runs each check isolated in a small pool of sandbox sessions
solve.py     the per-task loop (reply -> check -> feedback -> revise), concurrency, cache
report.py    pass counts per round, report.json, EvalPlus sample files, the terminal table
cli.py       ``codeloop eval humaneval``
"""
