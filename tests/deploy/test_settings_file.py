"""Settings as an operator writes them: ``./.env`` read by host-run commands, the environment
winning over it, and what ``CODELOOP_SYSTEM_PROMPT`` means (empty: built-in; ``none``: no system turn)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.agent import prompts
from bot.agent.loop import Turn
from bot.core.settings import Settings
from bot.llm.base import ChatMessage, GenerationParams

ENV_FILE = """\
# an operator's .env, as compose reads it too
CODELOOP_KEY_PREFIX=from-dotenv
CODELOOP_WORKER_CONCURRENCY=3
CODELOOP_SLACK_BOT_TOKEN="xoxb-from-dotenv"
DEPLOY_IMAGE=registry.example/codeloop:1
COMPOSE_PROFILES=tgi,slack
"""


@pytest.fixture
def dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".env").write_text(ENV_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CODELOOP_ENV_FILE")  # the default: ./.env
    return tmp_path


def test_dot_env_in_the_working_directory_is_read(dotenv: Path) -> None:
    settings = Settings.load()
    assert settings.key_prefix == "from-dotenv" and settings.worker_concurrency == 3
    assert settings.slack_bot_token is not None and settings.slack_bot_token.get_secret_value() == "xoxb-from-dotenv"


def test_the_environment_wins_over_the_file(dotenv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_KEY_PREFIX", "from-env")
    assert Settings.load().key_prefix == "from-env"
    assert Settings.load(key_prefix="override").key_prefix == "override"


def test_env_file_names_another_file_or_none(dotenv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = dotenv / "team.env"
    other.write_text("CODELOOP_KEY_PREFIX=team\n")
    monkeypatch.setenv("CODELOOP_ENV_FILE", str(other))
    assert Settings.load().key_prefix == "team"
    monkeypatch.setenv("CODELOOP_ENV_FILE", "")
    assert Settings.load().key_prefix == "codeloop"


def test_a_bad_value_in_the_file_names_the_variable(dotenv: Path) -> None:
    (dotenv / ".env").write_text("CODELOOP_WORKER_CONCURRENCY=lots\n")
    out = subprocess.run([sys.executable, "-m", "bot.cli", "doctor", "--only", "redis"], capture_output=True,
                         text=True, timeout=120, cwd=dotenv, env=_env_without_env_file())
    assert out.returncode == 1 and "CODELOOP_WORKER_CONCURRENCY" in out.stdout, out.stdout + out.stderr


def test_host_run_doctor_reads_dot_env(dotenv: Path) -> None:
    """The operator's path: `codeloop doctor` in the folder holding .env, nothing exported."""
    (dotenv / ".env").write_text("CODELOOP_REDIS_URL=redis://127.0.0.1:9/0\nCODELOOP_KEY_PREFIX=dotenv-prefix\n")
    out = subprocess.run([sys.executable, "-m", "bot.cli", "doctor", "--only", "redis"], capture_output=True,
                         text=True, timeout=120, cwd=dotenv, env=_env_without_env_file())
    assert "key prefix dotenv-prefix" in out.stdout and "127.0.0.1:9" in out.stdout, out.stdout


def _env_without_env_file() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "CODELOOP_ENV_FILE"}


class Recorder:
    """A ModelClient that records the prompt it is given and answers without code."""

    context_tokens = 16384

    def __init__(self) -> None:
        self.seen: list[list[ChatMessage]] = []

    async def stream_chat(self, messages: list[ChatMessage], params: GenerationParams,  # type: ignore[no-untyped-def]
                          usage: object = None):
        self.seen.append(messages)
        yield "done"

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return sum(len(m["content"]) for m in messages)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("value", "system"), [
    (None, prompts.SYSTEM_PROMPT),  # unset: codeloop's own prompt (sandbox, /mnt/data, no input())
    ("", prompts.SYSTEM_PROMPT),
    ("You are terse.", "You are terse."),
    ("none", None),  # no system turn: the chat template's default, as the model family was trained
    (" None ", None),
])
async def test_system_prompt_setting(value: str | None, system: str | None) -> None:
    settings = Settings.load(llm_url="http://127.0.0.1:9", system_prompt=value)
    model = Recorder()
    turn = Turn(model=model, params=GenerationParams(), max_rounds=0, feedback_chars=1000,  # type: ignore[arg-type]
                system_prompt=settings.system_turn(prompts.SYSTEM_PROMPT))

    async def emit(kind: str, payload: dict[str, object]) -> None:
        pass

    await turn.run("hello", emit, runner=None)  # type: ignore[arg-type]
    [messages] = model.seen
    expected = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hello"}]
    assert messages == expected
