"""The sandbox runner: untrusted Python in hardened, per-thread Docker containers.

The worker calls this library; nothing here knows about chat platforms or queues.
"""

from runner.config import SandboxConfig
from runner.janitor import ReapPolicy
from runner.manager import SandboxManager
from runner.results import ErrorInfo, ExecutionResult, FileResult, RichResult
from runner.session import SandboxSession

__all__ = [
    "ErrorInfo",
    "ExecutionResult",
    "FileResult",
    "ReapPolicy",
    "RichResult",
    "SandboxConfig",
    "SandboxManager",
    "SandboxSession",
]
