from __future__ import annotations

import pytest

from bot.cli import COMMANDS, main


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bad_setting_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CODELOOP_WORKER_CONCURRENCY", "-3")
    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert "CODELOOP_WORKER_CONCURRENCY" in err and "Traceback" not in err
