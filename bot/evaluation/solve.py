"""The per-task loop, run concurrently, with a per-task cache so an interrupted run resumes.

Round 0 is the first reply; round k is the reply after k ``Execution result:`` turns. A task stops
at its first pass, at a reply with no code (as the chat loop ends a turn there), or after
``rounds`` feedback rounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bot.agent.code import last_python_block
from bot.agent.feedback import model_feedback
from bot.evaluation.checker import CheckPool
from bot.evaluation.problems import Problem, build_solution, check_program, first_messages, reply_code
from bot.llm.base import ChatMessage, GenerationParams, ModelClient

Stop = Literal["passed", "no_code", "rounds"]


@dataclass
class Attempt:
    reply: str
    solution: str
    passed: bool
    #: the ``Execution result:`` turn a failure produced (also kept for the last round: it explains the failure)
    feedback: str | None = None


@dataclass
class TaskResult:
    task_id: str
    attempts: list[Attempt] = field(default_factory=list)
    stopped: Stop = "rounds"

    @property
    def first_pass(self) -> int | None:
        return next((k for k, a in enumerate(self.attempts) if a.passed), None)

    def to_json(self, key: str) -> str:
        return json.dumps({"key": key, **asdict(self)})

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TaskResult:
        return cls(raw["task_id"], [Attempt(**a) for a in raw["attempts"]], raw["stopped"])

    def usable_for(self, rounds: int) -> TaskResult | None:
        """This result as a run with ``rounds`` feedback rounds would have produced it, if it can tell:
        a task that stopped on its own (pass, no code) or that tried at least rounds+1 times."""
        if self.stopped == "rounds" and len(self.attempts) < rounds + 1:
            return None
        attempts = self.attempts[: rounds + 1]
        stopped: Stop = self.stopped if len(attempts) == len(self.attempts) else "rounds"
        return TaskResult(self.task_id, attempts, stopped)


@dataclass
class EvalOptions:
    rounds: int = 1
    concurrency: int = 8
    feedback_chars: int = 1000
    system_prompt: str | None = None
    #: who made the replies: a cached result is reused only when this matches
    model_id: str = ""


def cache_key(problem: Problem, params: GenerationParams, opts: EvalOptions, timeout_s: float) -> str:
    raw = json.dumps([problem.digest, opts.model_id, opts.system_prompt, opts.feedback_chars, timeout_s,
                      params.max_new_tokens, params.temperature, params.top_p, list(params.stop)])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_cache(path: Path) -> dict[str, tuple[str, TaskResult]]:
    """task_id -> (key, result); the last line for a task wins, a torn last line is ignored."""
    found: dict[str, tuple[str, TaskResult]] = {}
    if not path.exists():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            raw = json.loads(line)
            found[raw["task_id"]] = (raw["key"], TaskResult.from_json(raw))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the previous run was killed mid-write
    return found


class Evaluator:
    def __init__(self, client: ModelClient, params: GenerationParams, pool: CheckPool, opts: EvalOptions,
                 cache_path: Path, on_done: Callable[[TaskResult], None] | None = None) -> None:
        self.client = client
        self.params = params
        self.pool = pool
        self.opts = opts
        self.cache_path = cache_path
        self.on_done = on_done
        self.model_requests = 0
        self._generate_slots = asyncio.Semaphore(max(1, opts.concurrency))

    def key(self, problem: Problem) -> str:
        return cache_key(problem, self.params, self.opts, self.pool.timeout_s)

    def cached(self, problems: list[Problem]) -> dict[str, TaskResult]:
        results = {}
        cache = load_cache(self.cache_path)
        for problem in problems:
            key, result = cache.get(problem.task_id, ("", None))
            usable = result.usable_for(self.opts.rounds) if result is not None and key == self.key(problem) else None
            if usable is not None:
                results[problem.task_id] = usable
        return results

    async def _generate(self, messages: list[ChatMessage]) -> str:
        async with self._generate_slots:
            self.model_requests += 1
            return "".join([delta async for delta in self.client.stream_chat(messages, self.params)])

    async def solve(self, problem: Problem) -> TaskResult:
        messages = first_messages(problem, self.opts.system_prompt)
        result = TaskResult(problem.task_id)
        for round_no in range(self.opts.rounds + 1):
            reply = await self._generate(messages)
            code = reply_code(reply, last_python_block(reply))
            if code is None:
                result.attempts.append(Attempt(reply, "", passed=False))
                result.stopped = "no_code"
                break
            solution = build_solution(problem, code)
            nonce = f"codeloop-pass-{secrets.token_hex(8)}"
            outcome = await self.pool.check(check_program(problem, solution, nonce))
            passed = outcome.ok and any(r.text == repr(nonce) for r in outcome.results)
            feedback = None if passed else model_feedback(outcome, self.opts.feedback_chars, [], [])
            result.attempts.append(Attempt(reply, solution, passed, feedback))
            if passed:
                result.stopped = "passed"
                break
            if round_no < self.opts.rounds:
                assert feedback is not None
                messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": feedback}]
        return result

    async def run(self, problems: list[Problem]) -> dict[str, TaskResult]:
        """Every problem's result: cached ones as they are, the rest solved and appended to the cache."""
        results = self.cached(problems)
        todo: asyncio.Queue[Problem] = asyncio.Queue()
        for problem in problems:
            if problem.task_id not in results:
                todo.put_nowait(problem)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)

        torn = self.cache_path.exists() and not self.cache_path.read_bytes().endswith(b"\n")
        with self.cache_path.open("a", encoding="utf-8") as cache:
            if torn and self.cache_path.stat().st_size:
                cache.write("\n")  # end a line cut short by a kill, or the next entry would be lost with it

            async def worker() -> None:
                while not todo.empty():
                    problem = todo.get_nowait()
                    result = await self.solve(problem)
                    results[problem.task_id] = result
                    cache.write(result.to_json(self.key(problem)) + "\n")
                    cache.flush()  # a finished task survives a kill of this process
                    if self.on_done is not None:
                        self.on_done(result)

            # More tasks in flight than generation slots: while some wait on the sandbox, others
            # keep the model server's slots full.
            workers = min(todo.qsize(), max(1, self.opts.concurrency) + self.pool.size)
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        return results
