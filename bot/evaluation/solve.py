"""The per-task loop, run concurrently, with a per-task cache so an interrupted run resumes.

Round 0 is the first reply; round k is the reply after k feedback turns. A track stops at its
first pass, at a reply with no code (as the chat loop ends a turn there), or after ``rounds``
feedback rounds. "Pass" means every test the problem has: with EvalPlus's sets a task whose base
tests pass keeps revising on its plus-test failures, which is exactly OpenCodeInterpreter's "plus"
run; the base column is read off the same track (up to its first base pass the conversation is
the one their "base" run had, since a failing base test is what both are shown).

Two tracks share round 0: execution feedback (the ``Execution result:`` turn chat sends) and,
with a critic, synthesized human feedback (the same turn followed by the critic's critique).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bot.agent.code import last_python_block
from bot.agent.feedback import model_feedback
from bot.agent.prompts import FEEDBACK_PREFIX
from bot.evaluation.critic import Critic
from bot.evaluation.grading import MIN_TIME_LIMIT_S, TIME_LIMIT_FACTOR, Grader
from bot.evaluation.problems import Problem, build_solution, first_messages, reply_code
from bot.llm.base import ChatMessage, GenerationParams, ModelClient

Stop = Literal["passed", "no_code", "rounds"]
Track = Literal["execution", "human"]


@dataclass
class Attempt:
    reply: str
    solution: str
    #: every test the problem has passed (base, and plus where there are plus tests)
    passed: bool
    #: the ``Execution result:`` turn a failure produced (also kept for the last round: it explains the failure)
    feedback: str | None = None
    #: the base tests passed; None means "same as passed" (a problem without plus tests)
    base_passed: bool | None = None

    @property
    def base_ok(self) -> bool:
        return self.passed if self.base_passed is None else self.base_passed

    @property
    def no_code(self) -> bool:
        return not self.passed and self.feedback is None


def first_index(attempts: list[Attempt], base: bool = False) -> int | None:
    return next((k for k, a in enumerate(attempts) if (a.base_ok if base else a.passed)), None)


def _usable(attempts: list[Attempt], stopped: Stop, rounds: int) -> tuple[list[Attempt], Stop] | None:
    """A track as a run with ``rounds`` feedback rounds would have produced it, if it can tell:
    one that stopped on its own (pass, no code) or that tried at least rounds+1 times."""
    if stopped == "rounds" and len(attempts) < rounds + 1:
        return None
    kept = attempts[: rounds + 1]
    return kept, stopped if len(kept) == len(attempts) else "rounds"


@dataclass
class TaskResult:
    task_id: str
    #: the execution-feedback track, round 0 first
    attempts: list[Attempt] = field(default_factory=list)
    stopped: Stop = "rounds"
    #: the human-feedback track after round 0 (which it shares); None when it was not run
    human: list[Attempt] | None = None
    human_stopped: Stop | None = None
    #: the critique of each attempt of the human track (round 0 included) that led to a revision
    critiques: list[str] = field(default_factory=list)
    #: Critic.id of who wrote them
    critic: str | None = None

    def track(self, which: Track) -> list[Attempt]:
        if which == "human":
            return self.attempts[:1] + (self.human or [])
        return self.attempts

    @property
    def first_pass(self) -> int | None:
        return first_index(self.attempts)

    def to_json(self, key: str) -> str:
        return json.dumps({"key": key, **asdict(self)})

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TaskResult:
        human = raw.get("human")
        return cls(raw["task_id"], [Attempt(**a) for a in raw["attempts"]], raw["stopped"],
                   None if human is None else [Attempt(**a) for a in human], raw.get("human_stopped"),
                   list(raw.get("critiques") or []), raw.get("critic"))

    def usable_for(self, rounds: int, critic: str | None = None) -> TaskResult | None:
        """This result cut to ``rounds``, or None when its execution track cannot answer that. The
        human track is dropped (left to be run) unless ``critic`` wrote it and it answers too."""
        execution = _usable(self.attempts, self.stopped, rounds)
        if execution is None:
            return None
        result = TaskResult(self.task_id, *execution)
        if critic is not None and self.critic == critic and self.human is not None and self.human_stopped:
            human = _usable(self.track("human"), self.human_stopped, rounds)
            if human is not None:
                result.human, result.human_stopped = human[0][1:], human[1]
                result.critiques, result.critic = self.critiques[: len(human[0]) - 1], critic
        return result


@dataclass
class EvalOptions:
    rounds: int = 1
    concurrency: int = 8
    feedback_chars: int = 1000
    system_prompt: str | None = None
    #: who made the replies: a cached result is reused only when this matches
    model_id: str = ""


def cache_key(problem: Problem, params: GenerationParams, opts: EvalOptions, timeout_s: float) -> str:
    raw = json.dumps([problem.digest, first_messages(problem, opts.system_prompt), opts.model_id,
                      opts.feedback_chars, timeout_s, MIN_TIME_LIMIT_S, TIME_LIMIT_FACTOR,
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
    def __init__(self, client: ModelClient, params: GenerationParams, grader: Grader, opts: EvalOptions,
                 cache_path: Path, on_done: Callable[[TaskResult], None] | None = None,
                 critic: Critic | None = None) -> None:
        self.client = client
        self.params = params
        self.grader = grader
        self.opts = opts
        self.cache_path = cache_path
        self.on_done = on_done
        self.critic = critic
        self.model_requests = 0
        self._generate_slots = asyncio.Semaphore(max(1, opts.concurrency))
        self._critic_slots = asyncio.Semaphore(max(1, opts.concurrency))

    def key(self, problem: Problem) -> str:
        return cache_key(problem, self.params, self.opts, self.grader.pool.timeout_s)

    def complete(self, result: TaskResult) -> bool:
        return self.critic is None or result.human is not None

    def cached(self, problems: list[Problem]) -> dict[str, TaskResult]:
        """Reusable cached results; some may still lack the human track (``complete`` says)."""
        results = {}
        cache = load_cache(self.cache_path)
        critic = None if self.critic is None else self.critic.id
        for problem in problems:
            key, result = cache.get(problem.task_id, ("", None))
            usable = result.usable_for(self.opts.rounds, critic) if result is not None and key == self.key(problem) \
                else None
            if usable is not None:
                results[problem.task_id] = usable
        return results

    async def _generate(self, messages: list[ChatMessage]) -> str:
        async with self._generate_slots:
            self.model_requests += 1
            return "".join([delta async for delta in self.client.stream_chat(messages, self.params)])

    async def _attempt(self, problem: Problem, messages: list[ChatMessage]) -> Attempt:
        reply = await self._generate(messages)
        code = reply_code(reply, last_python_block(reply))
        if code is None:
            return Attempt(reply, "", passed=False)
        solution = build_solution(problem, code)
        verdict = await self.grader.grade(problem, solution)
        feedback = None if verdict.passed else model_feedback(verdict.shown, self.opts.feedback_chars, [], [])
        base = None if verdict.plus is None else verdict.base
        return Attempt(reply, solution, verdict.passed, feedback, base)

    async def _critique(self, problem: Problem, attempt: Attempt) -> str:
        assert self.critic is not None and attempt.feedback is not None
        shown = attempt.feedback.removeprefix(FEEDBACK_PREFIX)
        async with self._critic_slots:
            return await self.critic.critique(problem.prompt, attempt.solution, shown, problem.canonical_solution)

    async def _extend(self, problem: Problem, track: list[Attempt], critiques: list[str] | None) -> Stop:
        """Play a track to its end; ``track`` may already hold its first attempts (round 0)."""
        messages = first_messages(problem, self.opts.system_prompt)
        for round_no in range(self.opts.rounds + 1):
            if round_no == len(track):
                track.append(await self._attempt(problem, messages))
            attempt = track[round_no]
            if attempt.passed:
                return "passed"
            if attempt.no_code:
                return "no_code"
            if round_no == self.opts.rounds:
                break
            assert attempt.feedback is not None
            turn = attempt.feedback
            if critiques is not None:
                assert self.critic is not None
                if round_no == len(critiques):
                    critiques.append(await self._critique(problem, attempt))
                turn = self.critic.turn(attempt.feedback, critiques[round_no])
            messages = [*messages, {"role": "assistant", "content": attempt.reply}, {"role": "user", "content": turn}]
        return "rounds"

    async def solve(self, problem: Problem, prior: TaskResult | None = None) -> TaskResult:
        """Both tracks of a task; ``prior`` is a cached result whose execution track is reused."""
        result = prior or TaskResult(problem.task_id)
        if prior is None:
            result.stopped = await self._extend(problem, result.attempts, None)
        if self.critic is not None and result.human is None:
            track, critiques = result.attempts[:1], list[str]()
            result.human_stopped = await self._extend(problem, track, critiques)
            result.human, result.critiques, result.critic = track[1:], critiques, self.critic.id
        return result

    async def run(self, problems: list[Problem]) -> dict[str, TaskResult]:
        """Every problem's result: complete cached ones as they are, the rest solved (or finished)
        and appended to the cache."""
        results = self.cached(problems)
        todo: asyncio.Queue[Problem] = asyncio.Queue()
        for problem in problems:
            cached = results.get(problem.task_id)
            if cached is None or not self.complete(cached):
                todo.put_nowait(problem)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)

        torn = self.cache_path.exists() and not self.cache_path.read_bytes().endswith(b"\n")
        with self.cache_path.open("a", encoding="utf-8") as cache:
            if torn and self.cache_path.stat().st_size:
                cache.write("\n")  # end a line cut short by a kill, or the next entry would be lost with it

            async def worker() -> None:
                while not todo.empty():
                    problem = todo.get_nowait()
                    result = await self.solve(problem, results.get(problem.task_id))
                    results[problem.task_id] = result
                    cache.write(result.to_json(self.key(problem)) + "\n")
                    cache.flush()  # a finished task survives a kill of this process
                    if self.on_done is not None:
                        self.on_done(result)

            # More tasks in flight than generation slots: while some wait on the sandbox, others
            # keep the model server's slots full.
            workers = min(todo.qsize(), max(1, self.opts.concurrency) + self.grader.pool.size)
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        return results

