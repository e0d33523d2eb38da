"""Turning an execution result into what the chat shows and what the model reads."""

from __future__ import annotations

from bot.agent import prompts
from runner.results import ExecutionResult


def cut_middle(text: str, limit: int) -> str:
    """Keep the head and the tail (the demo keeps the first and last 200 characters)."""
    if len(text) <= limit:
        return text
    half = max(1, (limit - 40) // 2)
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"


def _result_texts(result: ExecutionResult) -> list[str]:
    out = []
    for item in result.results:
        if item.text is not None and not any(m in item.data for m in ("image/png", "image/jpeg")):
            out.append(item.text)
    return out


def chat_output(result: ExecutionResult) -> str:
    """Everything the cell printed or returned, as the user should see it."""
    parts = [result.stdout.rstrip("\n"), result.stderr.rstrip("\n"), *_result_texts(result)]
    if result.error is not None:
        parts.append(result.error.traceback.rstrip("\n") or f"{result.error.name}: {result.error.value}")
    if result.timed_out:
        parts.append(prompts.TIMED_OUT.format(seconds=round(result.duration_s)))
    if result.oom_killed:
        parts.append(prompts.OOM_KILLED)
    parts.extend(result.notes)
    return "\n".join(p for p in parts if p)


def model_feedback(result: ExecutionResult, limit: int, image_names: list[str], notes: list[str]) -> str:
    """The user turn the model reads: ``Execution result:`` + output cut head+tail."""
    text = chat_output(result)
    body = cut_middle(text, limit) if text else ""
    extra = [prompts.image_placeholder(n) for n in image_names]
    if result.restarted and not result.timed_out and not result.oom_killed:
        extra.append(prompts.SESSION_RESTARTED)
    extra.extend(notes)
    if not body and not extra:
        body = prompts.EMPTY_OUTPUT
    return prompts.FEEDBACK_PREFIX + "\n".join(p for p in [body, *extra] if p)
