from __future__ import annotations

import pytest

from bot.core.errors import ConfigError
from bot.core.settings import Settings


def test_defaults_are_the_papers(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.load()
    assert s.backend == "transformers" and s.model == "m-a-p/OpenCodeInterpreter-DS-1.3B"
    assert (s.max_new_tokens, s.temperature, s.max_rounds) == (1024, 0.0, 3)


def test_url_selects_tgi_and_lists_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_LLM_URL", "http://127.0.0.1:8080")
    monkeypatch.setenv("CODELOOP_SLACK_ALLOWED_CHANNELS", "C1, C2,")
    s = Settings.load()
    assert s.backend == "tgi" and s.slack_allowed_channels == ["C1", "C2"]


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_MAX_ROUNDS", "many")
    with pytest.raises(ConfigError, match="CODELOOP_MAX_ROUNDS"):
        Settings.load()


def test_tgi_without_url_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_LLM_BACKEND", "tgi")
    with pytest.raises(ConfigError, match="CODELOOP_LLM_URL"):
        Settings.load()


def test_require_names_every_missing_setting() -> None:
    with pytest.raises(ConfigError, match="CODELOOP_SLACK_BOT_TOKEN, CODELOOP_SLACK_APP_TOKEN"):
        Settings.load().require("slack_bot_token", "slack_app_token")


def test_secrets_do_not_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_SLACK_BOT_TOKEN", "xoxb-very-secret")
    s = Settings.load()
    assert "xoxb-very-secret" not in repr(s) and "xoxb-very-secret" not in str(s)


def test_model_profiles_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_MODEL_PROFILES",
                       "fast=http://tgi-1.3b:80, Big=http://vllm-33b:8000/|served-name,gw=https://gw.example/v1path")
    profiles = Settings.load().profiles
    assert list(profiles) == ["fast", "big", "gw"]
    assert (profiles["fast"].url, profiles["fast"].model) == ("http://tgi-1.3b:80", None)
    assert (profiles["big"].url, profiles["big"].model) == ("http://vllm-33b:8000", "served-name")
    assert Settings.load(model_profiles="").profiles == {}


@pytest.mark.parametrize(("value", "expect"), [
    ("fast", "is not name=url"),
    ("=http://h:80", "a profile name is"),
    ("my model=http://h:80", "a profile name is"),
    ("default=http://h:80", "names the worker's own model"),
    ("fast=tgi:80", "is not an http(s)://host"),
    ("fast=ftp://h:80", "is not an http(s)://host"),
    ("fast=http://h:99999", "is not a URL"),
    ("fast=http://h:80?x=1", "is not an http(s)://host"),
    ("fast=http://h:80|", "served model name after '|' is empty"),
    ("fast=http://h:80|two words", "served model name after '|' is empty or has spaces"),
    ("fast=http://a:80,FAST=http://b:80", "profile fast is named more than once"),
])
def test_bad_model_profiles_fail_with_the_entry_named(monkeypatch: pytest.MonkeyPatch, value: str,
                                                      expect: str) -> None:
    monkeypatch.setenv("CODELOOP_MODEL_PROFILES", value)
    with pytest.raises(ConfigError, match="CODELOOP_MODEL_PROFILES") as raised:
        Settings.load()
    assert expect in str(raised.value)
