"""The one errors module of codeloop.

    CodeloopError                      root: everything codeloop raises on purpose
    ├── ConfigError                    a setting is missing or invalid (names it)
    ├── QueueError                     Redis stream / lock problems
    │   ├── PoisonJob                  an entry that can never be processed (bad JSON, schema)
    │   └── JobLost                    a job's entry vanished from the stream, or its turn never came
    ├── Refused                        a limit turned a request away before it ran (says when to retry)
    │   ├── RateLimited                a user's or channel's token bucket is empty (bot/queue/ratelimit.py)
    │   ├── TooManyPending             the user already has the most requests queued or running
    │   └── ServiceBusy                Redis is close to its maxmemory: new jobs are shed
    ├── ModelError                     the model backend failed
    │   └── ModelOverloaded            429/503 that persisted through the retries
    ├── SandboxError                   the Docker sandbox failed (not the user's code)
    │   ├── SandboxUnavailable         engine unreachable or image missing (says how to fix)
    │   └── SessionLost                the thread's session died or expired; state is gone
    │       └── MalformedReply         the sandbox sent what no honest executor sends (killed, replaced)
    ├── InputRejected                  bad user input: huge text, oversize or binary upload…
    │   └── DownloadRefused            an upload's host resolved to a non-public address
    └── JobCancelled                   the user pressed Stop

Adapters turn these into user-facing messages with `user_message()`; nothing else should
show a raw traceback to a chat user.

Two texts per error: ``str(error)`` is the detail, for logs and for the operator's terminal
(``bot/cli.py`` prints it); it may name the model server's URL, Redis or Docker addresses, or
carry a library's exception text. ``user_message()`` is what a chat user sees, and must never
name an internal host: it is the ``for_user=`` text the raiser wrote, else the class's
``generic`` text (set on the classes whose detail is built from library errors and addresses),
else, for classes whose messages are written for users (InputRejected…), the detail itself.
"""

from __future__ import annotations

import math
from typing import ClassVar


class CodeloopError(Exception):
    """Root of every error codeloop raises on purpose."""

    #: short machine-readable kind, used in error events and metrics
    kind = "internal"
    #: what chat users see in place of the detail; None where the detail is written for them
    generic: ClassVar[str | None] = None

    def __init__(self, *args: object, for_user: str | None = None) -> None:
        super().__init__(*args)
        #: a message for chat users that the raiser wrote, free of hosts and library error text
        self.for_user = for_user

    def user_message(self) -> str:
        return self.for_user or self.generic or str(self) or self.__class__.__name__


class ConfigError(CodeloopError):
    kind = "config"


class QueueError(CodeloopError):
    kind = "queue"
    generic = "The job queue is not reachable right now; try again in a minute."


class PoisonJob(QueueError):
    kind = "poison"
    generic = "This request could not be read, so it was not run. Please send it again."


class JobLost(QueueError):
    kind = "lost"
    generic = "This message was lost before it could run, so it was skipped. Please send it again."


class Refused(CodeloopError):
    """A limit refused a request before it ran; ``retry_after_s`` says when trying again may work."""

    kind = "refused"

    def __init__(self, *args: object, retry_after_s: float = 0.0, for_user: str | None = None) -> None:
        super().__init__(*args, for_user=for_user)
        self.retry_after_s = retry_after_s


class RateLimited(Refused):
    """A user or channel sent more requests than its limit allows; says when to try again."""

    kind = "rate_limited"

    def __init__(self, scope: str, limit: int, retry_after_s: float) -> None:
        self.scope = scope
        self.limit = limit
        wait = max(1, math.ceil(retry_after_s))
        if scope == "reset":
            text = f"You're resetting sessions faster than {limit} per minute; try again in {wait}s. Nothing was reset."
        else:
            who = "You're" if scope == "user" else "This channel is"
            text = (f"{who} sending requests faster than {limit} per minute; try again in {wait}s. "
                    "This request was not run.")
        super().__init__(text, retry_after_s=retry_after_s)


class TooManyPending(Refused):
    kind = "too_many_pending"

    def __init__(self, limit: int, retry_after_s: float = 0.0) -> None:
        self.limit = limit
        plural = "request" if limit == 1 else "requests"
        super().__init__(f"You already have {limit} {plural} waiting or running, the most allowed at once. "
                         "Wait for one to finish, then send this again. This request was not run.",
                         retry_after_s=retry_after_s)


class ServiceBusy(Refused):
    kind = "shed"
    generic = ("The service is short of storage right now, so this request was not run. "
               "Please try again in a few minutes.")


class ModelError(CodeloopError):
    kind = "model"
    generic = "The model could not answer this time; try again in a minute."


class ModelOverloaded(ModelError):
    kind = "model_overloaded"
    generic = "The model server is overloaded and did not recover after retries. Try again shortly."


class SandboxError(CodeloopError):
    kind = "sandbox"
    generic = "The code sandbox is not available right now; try again in a minute."


class SandboxUnavailable(SandboxError):
    kind = "sandbox_unavailable"


class SessionLost(SandboxError):
    kind = "session_lost"
    generic = ("This thread's Python session ended unexpectedly; its variables are gone. Send the request "
               "again to start a fresh session (your files in /mnt/data are put back).")


class MalformedReply(SessionLost):
    """A reply that breaks the protocol: the container is removed, the detail goes to the log only."""

    kind = "sandbox_malformed"


class InputRejected(CodeloopError):
    kind = "input_rejected"


class DownloadRefused(InputRejected):
    """Raised by the downloads' resolver; ``bot.worker.downloads`` turns it into a message naming the file."""


class JobCancelled(CodeloopError):
    kind = "cancelled"

    def user_message(self) -> str:
        return "Stopped."
