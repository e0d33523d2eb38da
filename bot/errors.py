"""The one errors module of codeloop.

    CodeloopError                      root: everything codeloop raises on purpose
    ├── ConfigError                    a setting is missing or invalid (names it)
    ├── QueueError                     Redis stream / lock problems
    │   └── PoisonJob                  an entry that can never be processed (bad JSON, schema)
    ├── ModelError                     the model backend failed
    │   └── ModelOverloaded            429/503 that persisted through the retries
    ├── SandboxError                   the Docker sandbox failed (not the user's code)
    │   ├── SandboxUnavailable         engine unreachable or image missing (says how to fix)
    │   └── SessionLost                the thread's session died or expired; state is gone
    ├── InputRejected                  bad user input: huge text, oversize or binary upload…
    └── JobCancelled                   the user pressed Stop

Adapters turn these into user-facing messages with `user_message()`; nothing else should
show a raw traceback to a chat user.
"""

from __future__ import annotations


class CodeloopError(Exception):
    """Root of every error codeloop raises on purpose."""

    #: short machine-readable kind, used in error events and metrics
    kind = "internal"

    def user_message(self) -> str:
        return str(self) or self.__class__.__name__


class ConfigError(CodeloopError):
    kind = "config"


class QueueError(CodeloopError):
    kind = "queue"


class PoisonJob(QueueError):
    kind = "poison"


class ModelError(CodeloopError):
    kind = "model"


class ModelOverloaded(ModelError):
    kind = "model_overloaded"

    def user_message(self) -> str:
        return f"The model server is overloaded and did not recover after retries ({self}). Try again shortly."


class SandboxError(CodeloopError):
    kind = "sandbox"


class SandboxUnavailable(SandboxError):
    kind = "sandbox_unavailable"


class SessionLost(SandboxError):
    kind = "session_lost"


class InputRejected(CodeloopError):
    kind = "input_rejected"


class JobCancelled(CodeloopError):
    kind = "cancelled"

    def user_message(self) -> str:
        return "Stopped."
