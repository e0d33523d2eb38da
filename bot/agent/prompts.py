"""Texts the model sees: the system prompt and the execution-feedback turns.

The feedback turn starts with ``Execution result:`` and a newline, the form the
OpenCodeInterpreter models were trained on (Code-Feedback data set).
"""

from __future__ import annotations

SYSTEM_PROMPT = """You are a data and coding assistant working in a team chat. You can run Python.
When code would help, write one complete ```python block. It runs in a persistent Python session \
that belongs to this chat thread: variables, imports and files stay available for follow-up questions.
Files the user uploads are in /mnt/data; save files you create there too. numpy, pandas and \
matplotlib are installed; figures are shown to the user automatically (no need to call plt.show()). \
There is no network access and no keyboard input: never call input(), assign values in the code instead.
After the code runs you will see its output as "Execution result:". If it failed, explain the problem \
briefly and write corrected code. When the task is done, answer in plain words without a code block."""

FEEDBACK_PREFIX = "Execution result:\n"

EMPTY_OUTPUT = (
    "(the code ran without printing anything) Print the values you want to check, "
    "or add a short test that prints its result."
)

INPUT_NOT_RUN = (
    "The code was not run because it calls input(), which cannot read from a chat. "
    "Assign the values directly in the code instead."
)

SESSION_RESTARTED = ("Note: the Python session was restarted; variables from earlier are gone (files in /mnt/data "
                     "are kept).")

TIMED_OUT = "Timed out after {seconds:g} s: the cell was interrupted. Make it faster or work on less data."

OOM_KILLED = "The process ran out of memory and was killed; the session was restarted."


def image_placeholder(name: str) -> str:
    return f"[image {name} shown to the user]"


def files_note(names: list[str]) -> str:
    return "[files uploaded to /mnt/data: " + ", ".join(names) + "]"

#: around a thread's earlier messages, when the bot is first brought into an existing thread
THREAD_CONTEXT_INTRO = "Earlier messages in this thread, before you were asked (oldest first):"
THREAD_CONTEXT_ASK = "Now the request to you:"
