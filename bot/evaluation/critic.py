"""Synthesized human feedback: a second model writes a short human-style critique of a failed attempt.

The prompts are OpenCodeInterpreter's, character for character, from
evaluation/evaluate/multi_turn/gen_plus_solution_multiround_human_feedback.py (and ..._oracle.py
for the Oracle row) at commit e1d553c0426d671522a6f8d289ecbf456ab55609: a "You are a helpful
assistant." system turn and one user turn with the problem, the existing code and its execution
result (the Oracle variant adds the canonical solution, which the critic must not reveal). Their
critic was GPT-4 (the paper); ``--human-feedback-url`` is any OpenAI-compatible server: OpenAI
itself, or TGI/vLLM serving a strong open model. Decoding is greedy with up to 1024 tokens, as in
their example client (evaluation/evaluate/multi_turn/chat_with_gpt.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp

from bot.core.errors import ModelError

log = logging.getLogger(__name__)

SYSTEM = "You are a helpful assistant."
_HEAD = (
    "You are tasked with providing guidance to a programmer who has drafted a code for a programming problem. \n"
)
_STEPS = (
    "Begin by thoroughly examining the existing code and its functionality.\n"
)
_TAIL = (
    "Offer guidance in a clear and understandable manner, explaining the rationale behind each suggestion.\n"
    "Refrain from providing actual code solutions, but instead focus on conceptual modifications or strategies.\n"
    "Provide constructive feedback to help the programmer improve their coding skills.\n"
    "Remember, your role is to simulate human-like guidance and expertise in programming without directly "
    "implementing solutions.\n"
    "Please respond in no more than three sentences.\n\n"
    "@@Problem\n{problem}\n\n"
    "@@Existing Code\n{code}\n\n"
    "@@Execution Result\n{result}\n\n"
)
CRITIC_PROMPT = (
    _HEAD
    + "Your role is to mimic human-like responses and offer suggestions for modifying the code based on the "
    "observed execution results.\n"
    "You should refrain from directly writing code.\n"
    + _STEPS
    + "Analyze the @@Execution Result obtained from running the @@Existing Code. Identify any errors, unexpected "
    "behavior, or deviations from the expected output.\n"
    "Consider potential edge cases, optimization opportunities, or alternative approaches based on insights from "
    "the @@Execution Result.\n"
    + _TAIL
    + "@@Guidance\n"
)
ORACLE_PROMPT = (
    _HEAD
    + "Your role is to mimic human-like responses and offer suggestions for modifying the code based on the "
    "canonical solution and the observed execution results.\n"
    'You should NOT directly revealing contents of the @@Canonical Solution or mentioning terms such as '
    '"canonical solution."\n'
    "You should refrain from directly writing code.\n"
    + _STEPS
    + "Compare the @@Existing Code with the @@Canonical Solution provided. Note any discrepancies in logic, "
    "approach, or implementation.\n"
    "Analyze the @@Execution Result obtained from running the @@Existing Code. Identify any errors, unexpected "
    "behavior, or deviations from the expected output.\n"
    "Consider potential edge cases, optimization opportunities, or alternative approaches based on insights from "
    "both the @@Canonical Solution and @@Execution Result.\n"
    + _TAIL
    + "@@Canonical Solution\n{canonical}\n\n"
    "@@Guidance\n"
)
RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})


def completions_url(url: str) -> str:
    """An OpenAI-style base (``https://host/v1``), a server root (TGI: ``http://host:8080``) or
    the full endpoint, as huggingface_hub resolves them."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def critic_messages(problem: str, code: str, result: str, canonical: str | None = None) -> list[dict[str, str]]:
    fields = {"problem": problem.strip(), "code": code, "result": result}
    prompt = ORACLE_PROMPT.format(canonical=canonical, **fields) if canonical is not None else \
        CRITIC_PROMPT.format(**fields)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


class Critic:
    """A second OpenAI-compatible chat server that writes the critique."""

    def __init__(self, url: str, model: str, *, token: str | None = None, oracle: bool = False,
                 critique_only: bool = False, timeout_s: float = 120.0, retries: int = 4,
                 backoff_s: float = 0.5, max_tokens: int = 1024) -> None:
        self.url = completions_url(url)
        self.model = model
        self.oracle = oracle
        #: the revision turn is the critique alone, as in the seed's script (default: after the execution result)
        self.critique_only = critique_only
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.requests = 0
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    @property
    def id(self) -> str:
        """What the critique depends on, for the cache."""
        flags = "".join(f"+{name}" for name, on in (("oracle", self.oracle), ("critique-only", self.critique_only))
                        if on)
        return f"{self.model}@{self.url}{flags}"

    def turn(self, execution_feedback: str, critique: str) -> str:
        """The user turn the model revises from."""
        return critique if self.critique_only else f"{execution_feedback}\n\n{critique}"

    async def critique(self, problem: str, code: str, result: str, canonical: str | None) -> str:
        messages = critic_messages(problem, code, result, canonical if self.oracle else None)
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens,
                "stream": False}
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        last = ""
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                async with self._http.post(self.url, json=body, headers=self._headers) as resp:
                    if resp.status == 200:
                        return _content(await resp.json(content_type=None), self.url)
                    last = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    if resp.status not in RETRYABLE:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            if attempt < self.retries:
                delay = self.backoff_s * (2**attempt) * (1 + random.random() / 2)
                log.warning("critic %s: %s; retry %d/%d in %.2fs", self.url, last, attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
        raise ModelError(f"the human-feedback model at {self.url} did not answer: {last}")

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _content(payload: Any, url: str) -> str:
    try:
        text = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str) or not text.strip():
        raise ModelError(f"the human-feedback model at {url} sent no critique: {str(payload)[:300]}")
    return text.strip()
