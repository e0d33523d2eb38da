"""What chat users see of an error: never an internal address, whatever the detail says."""

from __future__ import annotations

import pytest
import redis

from bot.adapters.discord.intake import _start_failure
from bot.core.errors import (
    CodeloopError,
    InputRejected,
    ModelError,
    ModelOverloaded,
    QueueError,
    SandboxUnavailable,
    SessionLost,
)

HOSTS = ("tgi.internal", "docker-proxy", "10.0.0.7", "redis://")


@pytest.mark.parametrize("error", [
    ModelError("model server http://tgi.internal:8080 answered 500: for url: http://tgi.internal:8080/v1/chat"),
    ModelOverloaded("no answer from http://tgi.internal:8080 after 4 attempts"),
    SandboxUnavailable("cannot create a sandbox container (500 Server Error for http://docker-proxy:2375/v1.43)"),
    SessionLost("attach to sandbox 0123456789ab failed: Connect call failed ('10.0.0.7', 2375)"),
    QueueError("Redis is not reachable at redis://10.0.0.7:6379/0 (Error 111)"),
])
def test_errors_built_from_library_text_show_users_a_generic_message(error: CodeloopError) -> None:
    message = error.user_message()
    assert message and not any(host in message for host in HOSTS), message
    assert any(host in str(error) for host in HOSTS)  # the detail is kept for logs and the operator


def test_a_message_written_for_users_is_shown_as_is() -> None:
    assert InputRejected("`a.exe` looks like an executable").user_message() == "`a.exe` looks like an executable"
    error = ModelError("HTTP 422 from http://tgi.internal:8080", for_user="The model server turned it down (HTTP 422).")
    assert error.user_message() == "The model server turned it down (HTTP 422)."


def test_a_failed_discord_start_does_not_show_the_redis_address() -> None:
    told = _start_failure(redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused."))
    assert "10.0.0.7" not in told and "6379" not in told
    assert _start_failure(InputRejected("too long")) == "too long"
