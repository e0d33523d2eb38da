"""The sandbox runner: untrusted Python in hardened, per-thread Docker containers.

The worker calls this library; nothing here knows about chat platforms or queues.
"""

from runner.results import ErrorInfo, ExecutionResult, FileResult, RichResult

__all__ = ["ErrorInfo", "ExecutionResult", "FileResult", "RichResult"]
