"""One job's turn of the OpenCodeInterpreter loop.

reply -> last ```python block -> run in the thread's sandbox -> ``Execution result:`` turn ->
reply ... until a reply has no code, or ``max_rounds`` feedback rounds were used. The code of
the last allowed reply still runs (the user sees its output); the model just gets no more turns.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.agent import prompts
from bot.agent.code import calls_input, last_python_block
from bot.agent.feedback import chat_output, model_feedback
from bot.core.errors import InputRejected
from bot.core.jobs import FULL_OUTPUT_FILES
from bot.llm.base import ChatMessage, GenerationParams, ModelClient, TokenUsage
from bot.ops import metrics
from runner.results import ExecutionResult

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
DELTA_FLUSH_S = 0.1  # coalesce token deltas into ~10 events/s per reply


class CodeRunner(Protocol):
    """The thread's sandbox as the loop sees it (the worker acquires it lazily)."""

    async def run(self, code: str) -> tuple[ExecutionResult, list[str]]:
        """Run a cell; returns the result and notes for the model (e.g. the session was recreated)."""
        ...


@dataclass
class Turn:
    model: ModelClient
    params: GenerationParams
    max_rounds: int
    feedback_chars: int
    #: None sends no system turn: the model's chat template then applies its own default
    system_prompt: str | None = prompts.SYSTEM_PROMPT
    #: the conversation as it stands, without the system prompt; the worker saves it
    history: list[ChatMessage] = field(default_factory=list)
    rounds: int = 0
    final_text: str = ""
    images: int = 0
    #: the reply being streamed right now (what the user saw if they press Stop)
    partial: str = ""
    #: what the turn used, for usage accounting (bot/queue/usage.py): every generation's tokens
    #: (a cut-short one's too), the sandbox's CPU seconds over its cells, and whether the last cell
    #: it ran still failed (error, timeout, out of memory)
    tokens_in: int = 0
    tokens_out: int = 0
    cpu_s: float = 0.0
    last_cell_failed: bool = False

    async def run(self, user_text: str, emit: Emit, runner: CodeRunner) -> str:
        self.history.append({"role": "user", "content": user_text})
        for round_no in range(self.max_rounds + 1):
            reply = await self._generate(emit, round_no)
            self.history.append({"role": "assistant", "content": reply})
            self.rounds = round_no + 1
            self.final_text = reply
            code = last_python_block(reply)
            if code is None:
                break
            await emit("code", {"code": code, "language": "python", "round": round_no})
            feedback = await self._execute(code, emit, runner)
            if round_no == self.max_rounds:
                break
            self.history.append({"role": "user", "content": feedback})
        return self.final_text

    async def _generate(self, emit: Emit, round_no: int) -> str:
        messages = self._fit_context()
        await emit("status", {"text": "thinking" if round_no == 0 else f"revising (round {round_no + 1})"})
        parts: list[str] = []
        pending: list[str] = []
        last_flush = start = time.monotonic()
        chunks = 0
        usage = TokenUsage()
        try:
            async for delta in self.model.stream_chat(messages, self.params, usage):
                parts.append(delta)
                pending.append(delta)
                self.partial = "".join(parts)
                chunks += 1
                now = time.monotonic()
                if now - last_flush >= DELTA_FLUSH_S:
                    await emit("delta", {"text": "".join(pending), "round": round_no})
                    pending.clear()
                    last_flush = now
        finally:
            self.tokens_in += usage.prompt_tokens
            self.tokens_out += usage.completion_tokens
        if pending:
            await emit("delta", {"text": "".join(pending), "round": round_no})
        elapsed = time.monotonic() - start
        if chunks and elapsed > 0:
            metrics.GEN_TOKENS_PER_S.observe(chunks / elapsed)
        return "".join(parts).strip()

    async def _execute(self, code: str, emit: Emit, runner: CodeRunner) -> str:
        if calls_input(code):
            await emit("output", {"text": prompts.INPUT_NOT_RUN, "truncated": False, "error": None,
                                  "timed_out": False, "duration_s": 0.0, "skipped": True})
            return prompts.FEEDBACK_PREFIX + prompts.INPUT_NOT_RUN
        await emit("status", {"text": "running code"})
        result, notes = await runner.run(code)
        metrics.CELL_SECONDS.observe(result.duration_s)
        self.cpu_s += result.cpu_s or 0.0
        self.last_cell_failed = not result.ok
        for note in notes:
            await emit("status", {"text": note})
        error = {"name": result.error.name, "value": result.error.value} if result.error else None
        # A flooded stream comes back in full as the sandbox's stdout.txt / stderr.txt (file events
        # below): the adapters name those instead of attaching a second copy.
        full = [f.name for f in result.files if f.name in FULL_OUTPUT_FILES] if result.truncated else []
        await emit("output", {"text": chat_output(result), "truncated": result.truncated, "error": error,
                              "timed_out": result.timed_out, "oom_killed": result.oom_killed,
                              "duration_s": round(result.duration_s, 4), "full_output_files": full})
        names = []
        for mime, data in result.images:
            self.images += 1
            name = f"figure-{self.images}.{'png' if mime == 'image/png' else 'jpg'}"
            names.append(name)
            await emit("image", {"name": name, "mime": mime, "data_b64": data})
        for f in result.files:
            await emit("file", {"name": f.name, "mime": f.mime, "size": f.size,
                                "data_b64": base64.b64encode(f.data).decode()})
        return model_feedback(result, self.feedback_chars, names, notes)

    def _fit_context(self) -> list[ChatMessage]:
        """System prompt + history, dropping the oldest turns (never the newest) to fit."""
        system: list[ChatMessage] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        budget = self.model.context_tokens - self.params.max_new_tokens
        history = list(self.history)
        while len(history) > 1 and self.model.count_tokens(system + history) > budget:
            history.pop(0)
            # Never start on an assistant turn or a dangling feedback turn without its code.
            while len(history) > 1 and history[0]["role"] == "assistant":
                history.pop(0)
        if self.model.count_tokens(system + history) > budget:
            raise InputRejected(
                f"The message is too long for the model's context ({self.model.context_tokens} tokens). "
                "Shorten it or attach the text as a file."
            )
        return system + history
