"""The execution result contract (runner -> agent)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ErrorInfo:
    name: str
    value: str
    traceback: str  # ANSI-free


@dataclass(frozen=True)
class RichResult:
    """An execute_result or display_data item: one MIME bundle (mime -> str data; binary as base64)."""

    data: dict[str, str]
    kind: str = "display_data"  # or execute_result

    @property
    def text(self) -> str | None:
        return self.data.get("text/plain")


@dataclass(frozen=True)
class FileResult:
    """A file created or changed under /mnt/data by the cell (or the full output, kept as a file)."""

    name: str
    size: int
    data: bytes
    mime: str = "application/octet-stream"


@dataclass
class ExecutionResult:
    stdout: str = ""
    stderr: str = ""
    results: list[RichResult] = field(default_factory=list)
    error: ErrorInfo | None = None
    files: list[FileResult] = field(default_factory=list)
    duration_s: float = 0.0
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False
    #: the kernel had to be restarted (timeout it ignored, crash, OOM): variables are gone
    restarted: bool = False
    #: short notes for the user and the model (files capped, session was recreated, ...)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and not self.oom_killed

    @property
    def images(self) -> list[tuple[str, str]]:
        """(mime, base64) of every image in the rich results, in order."""
        out: list[tuple[str, str]] = []
        for item in self.results:
            for mime in ("image/png", "image/jpeg"):
                if mime in item.data:
                    out.append((mime, item.data[mime]))
                    break
        return out
