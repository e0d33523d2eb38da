"""Evaluation tests: scripted model server (a function of the messages), real Docker sandboxes."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from bot.core.settings import Settings
from bot.evaluation import cli
from bot.evaluation.datasets import load_problems
from bot.evaluation.problems import Problem
from runner.config import SandboxConfig
from runner.manager import SandboxManager
from tests.runner.conftest import IMAGE

PROBLEMS = load_problems()
_BY_PROMPT = {p.prompt.strip(): p for p in PROBLEMS}


def task_of(messages: list[dict[str, Any]]) -> Problem:
    """The problem a conversation is about, read back from the first user turn's python block."""
    first = next(m for m in messages if m["role"] == "user")
    found = re.search(r"```python\n(.*?)\n```", first["content"], re.DOTALL)
    assert found is not None, first["content"]
    return _BY_PROMPT[found.group(1)]


def feedback_turns(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages[1:] if m["role"] == "user"]


def fenced(code: str) -> str:
    return f"Here is the completed function:\n```python\n{code}\n```\nIt handles the edge cases."


def parse_args(*argv: str, benchmark: str = "humaneval") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args([benchmark, "--quiet", *argv])


@pytest.fixture
async def eval_manager(key_prefix: str) -> AsyncIterator[SandboxManager]:
    """A sandbox manager whose containers carry this test's label; all of them are removed after."""
    config = SandboxConfig(image=IMAGE, memory="256m", pool_size=0, labels={"codeloop.test": key_prefix})
    manager = SandboxManager(config)
    await manager.start()
    yield manager
    await manager.aclose()
    client = docker.from_env()
    leftovers = await asyncio.to_thread(client.containers.list, all=True,
                                        filters={"label": f"codeloop.test={key_prefix}"})
    for container in leftovers:
        await asyncio.to_thread(container.remove, force=True)
    client.close()
    assert not leftovers, f"the evaluation left {len(leftovers)} sandbox container(s) behind"


@pytest.fixture
def eval_settings(make_settings: Callable[..., Settings], model_server: Any) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(llm_url=model_server.url, feedback_chars=300, **overrides)

    return factory


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "eval"
