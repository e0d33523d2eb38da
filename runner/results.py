"""The execution result contract (runner -> agent), and the host's check of every reply.

A reply is written inside the sandbox, where the user's code runs with the executor's uid, so the
host parses it as hostile input (docs/SECURITY.md, "the host never trusts the sandbox").
``parse_result`` raises MalformedReply for anything no honest executor sends: a wrong type, a path
that leaves /mnt/data, a size that lies or passes a cap, base64 that is not, an image that is not
one. What an honest executor can send but the host does not pass on (a file name with control
characters or bytes that are not UTF-8, more rich results than the budget) is dropped with a note.
``ReplyLimits.max_line`` bounds the line the attach stream accepts (runner/attach.py).
"""

from __future__ import annotations

import base64
import binascii
import math
import mimetypes
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bot.core.errors import MalformedReply

if TYPE_CHECKING:
    from runner.config import SandboxConfig


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
    #: CPU seconds the sandbox used during the cell (its cgroup); None where the executor cannot
    #: measure it (no cgroup visible) or predates the field
    cpu_s: float | None = None
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


# --- what an honest executor can send ------------------------------------------------------------
#: the executor's markers around a cut text ("... [N characters omitted] ...", "output truncated: ...")
TEXT_MARGIN = 1_000
NAME_CHARS = 200  # an exception's type name
MAX_NOTES = 32
NOTE_CHARS = 2_000
#: rich results of one cell; beyond these the rest is dropped with a note (the kernel caps neither)
MAX_RICH_RESULTS = 100
RICH_TOTAL_CHARS = 16 * 1024 * 1024
RICH_CHARS = 200_000  # one text value but text/plain (the kernel drops larger ones: its RICH_CAP)
RICH_MIMES = frozenset(
    {"text/plain", "text/html", "text/markdown", "image/svg+xml", "image/png", "image/jpeg", "application/json"}
)
PATH_CHARS = 4096  # PATH_MAX
PART_BYTES = 255  # NAME_MAX
MAX_DEPTH = 32  # deeper paths are dropped with a note
#: worst-case JSON bytes of one str character: an astral one is escaped as two \uXXXX
JSON_CHAR = 12
LINE_MARGIN = 1024 * 1024  # keys, numbers, flags, per-item punctuation
#: json.loads makes an object of every value: a line of ``[[],[],...`` grows 20-fold in memory, so
#: the values of one line are bounded (counted with str.count, before parsing)
MAX_CONTAINERS = 200_000  # "[" and "{"
MAX_QUOTES = 400_000
MAX_COMMAS = 500_000
AMPLIFY_CHECK = 64 * 1024  # shorter lines cannot grow past a few MiB
#: a cell's CPU seconds: an honest one is at most its timeout times the container's CPUs; this is a
#: ceiling no configuration reaches (a day of CPU), so a figure past it is a lie, not a busy cell
MAX_CELL_CPU_S = 86_400.0
#: magic bytes of the images passed on (a PNG's signature and its IHDR chunk; a JPEG's SOI marker)
SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/jpeg": b"\xff\xd8\xff"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSAFE_NAME = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u2028\u2029\ud800-\udfff]")


def _b64_len(n: int) -> int:
    return 4 * math.ceil(n / 3)


@dataclass(frozen=True)
class ReplyLimits:
    """The largest reply an honest executor sends under one config (files counted with their base64)."""

    text_chars: int = 20_000 + TEXT_MARGIN
    max_files: int = 22
    max_file_bytes: int = 10 * 1024 * 1024
    max_total_file_bytes: int = 32 * 1024 * 1024
    #: the executor's own bound on its longest reply (``SandboxConfig.max_reply_bytes``), if known
    line_cap: int | None = None

    @classmethod
    def from_config(cls, config: SandboxConfig) -> ReplyLimits:
        return cls(
            text_chars=config.output_chars + TEXT_MARGIN,
            # + stdout.txt and stderr.txt (the full output), counted within the total by the executor
            max_files=config.max_files + 2,
            max_file_bytes=config.max_file_bytes,
            max_total_file_bytes=config.max_total_file_bytes,
            line_cap=config.max_reply_bytes,
        )

    @property
    def image_bytes(self) -> int:
        return self.max_file_bytes

    @property
    def max_line(self) -> int:
        """Bytes of the longest line the host reads: every field at its cap, escaped at its worst."""
        texts = (4 * self.text_chars + NAME_CHARS + MAX_NOTES * NOTE_CHARS) * JSON_CHAR  # out, err, error
        names = self.max_files * (PATH_CHARS * JSON_CHAR + 4)  # + base64 padding of each file
        worst = texts + names + _b64_len(self.max_total_file_bytes) + RICH_TOTAL_CHARS + LINE_MARGIN
        return worst if self.line_cap is None else min(worst, self.line_cap)


def check_amplification(line: str) -> None:
    """MalformedReply when parsing ``line`` could build far more objects than its length says."""
    if len(line) <= AMPLIFY_CHECK:
        return
    containers = line.count("[") + line.count("{")
    if containers > MAX_CONTAINERS or line.count('"') > MAX_QUOTES or line.count(",") > MAX_COMMAS:
        raise MalformedReply(f"a {len(line):,}-byte line of {containers:,} arrays/objects, "
                             f"{line.count(chr(34)):,} quotes, {line.count(','):,} commas")


# --- parsing ----------------------------------------------------------------------------------
def _type(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedReply(f"{what} is a {type(value).__name__}")
    return value


def clean_text(value: Any, limit: int, what: str) -> str:
    """A str field: type-checked, lone surrogates replaced (they cannot be encoded), cut at ``limit``."""
    text: str = _type(value, str, what)
    if len(text) > limit:
        text = text[:limit] + " ... [cut by the host]"
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _b64(value: Any, limit: int, what: str) -> bytes:
    """Strict base64 of at most ``limit`` decoded bytes, checked on its length before decoding."""
    text: str = _type(value, str, what)
    if len(text) % 4 or len(text) // 4 * 3 - text[-2:].count("=") > limit:
        raise MalformedReply(f"{what}: {len(text):,} characters of base64 (cap {limit:,} bytes)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedReply(f"{what} is not base64") from None


def safe_repr(name: str, limit: int = 80) -> str:
    """A name as notes can show it: escapes, no control characters, cut."""
    shown = ascii(name)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def check_file_name(value: Any) -> str | None:
    """A returned file's name (relative, under /mnt/data): raises MalformedReply for what no real
    path under /mnt/data is; returns a reason to drop it for a real name the host will not pass on."""
    name: str = _type(value, str, "a file name")
    if not name or len(name) > PATH_CHARS or "\0" in name or name.startswith("/"):
        raise MalformedReply(f"file name {safe_repr(name)}")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise MalformedReply(f"file name {safe_repr(name)} leaves /mnt/data or is not a path")
        try:
            size = len(part.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:  # a surrogate no file name decodes to
            raise MalformedReply(f"file name {safe_repr(name)}") from None
        if size > PART_BYTES:
            raise MalformedReply(f"file name {safe_repr(name)}: a part of {size} bytes")
    if len(parts) > MAX_DEPTH:
        return f"it is more than {MAX_DEPTH} folders deep"
    if _UNSAFE_NAME.search(name):
        return "its name has control characters, a backslash or bytes that are not UTF-8"
    return None


def _rich(item: Any, limits: ReplyLimits) -> tuple[RichResult, int]:
    item = _type(item, dict, "a rich result")
    kind = item.get("kind", "display_data")
    if kind not in ("display_data", "execute_result"):
        raise MalformedReply(f"rich result kind {safe_repr(str(kind))}")
    bundle = _type(item.get("data"), dict, "a rich result's data")
    data: dict[str, str] = {}
    size = 0
    for mime, value in bundle.items():
        if mime not in RICH_MIMES:
            raise MalformedReply(f"rich result of MIME type {safe_repr(str(mime))}")
        if mime in SIGNATURES:
            decoded = _b64(value, limits.image_bytes, mime)
            if not decoded.startswith(SIGNATURES[mime]):
                raise MalformedReply(f"an {mime} result that is not one ({len(decoded):,} bytes)")
            data[mime] = value
        elif mime == "text/plain":
            data[mime] = clean_text(value, limits.text_chars, mime)
        else:
            if len(_type(value, str, mime)) > RICH_CHARS:
                raise MalformedReply(f"a {mime} result of {len(value):,} characters")
            data[mime] = clean_text(value, RICH_CHARS, mime)
        size += len(data[mime])
    return RichResult(data=data, kind=kind), size


def _files(items: Any, limits: ReplyLimits, notes: list[str]) -> list[FileResult]:
    items = _type(items, list, "files")
    if len(items) > limits.max_files:
        raise MalformedReply(f"{len(items)} files (cap {limits.max_files})")
    files: list[FileResult] = []
    total = 0
    for item in items:
        item = _type(item, dict, "a file")
        name = item.get("name")
        drop = check_file_name(name)
        size = _type(item.get("size"), int, "a file size")
        _type(item.get("mime", ""), str, "a file's MIME type")  # checked, not believed: guessed from the name
        data = _b64(item.pop("data", None), limits.max_file_bytes, f"file {safe_repr(name)}")
        if size != len(data):
            raise MalformedReply(f"file {safe_repr(name)} says {size:,} bytes and holds {len(data):,}")
        total += size
        if total > limits.max_total_file_bytes:
            raise MalformedReply(f"files of {total:,} bytes together (cap {limits.max_total_file_bytes:,})")
        if drop is not None:
            notes.append(f"The file {safe_repr(name)} was not returned: {drop}.")
            continue
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        files.append(FileResult(name=name, size=size, data=data, mime=mime))
    return files


def parse_result(raw: Any, limits: ReplyLimits) -> ExecutionResult:
    """The executor's JSON result as an ExecutionResult, checked field by field (see the module doc).
    The file data strings are popped from ``raw`` as they are decoded (memory: one copy at a time)."""
    raw = _type(raw, dict, "the result")
    notes = [clean_text(n, NOTE_CHARS, "a note") for n in _type(raw.get("notes", []), list, "notes")[:MAX_NOTES]]
    error = raw.get("error")
    if error is not None:
        error = _type(error, dict, "the error")
        error = ErrorInfo(
            name=clean_text(error.get("name"), NAME_CHARS, "the error name"),
            value=clean_text(error.get("value"), limits.text_chars, "the error value"),
            traceback=clean_text(error.get("traceback"), limits.text_chars, "the traceback"),
        )
    results: list[RichResult] = []
    budget = RICH_TOTAL_CHARS
    items = _type(raw.get("results", []), list, "results")
    for item in items[:MAX_RICH_RESULTS]:
        result, size = _rich(item, limits)
        budget -= size
        if budget < 0:
            break
        results.append(result)
    if len(results) < len(items):
        notes.append(f"Only the first {len(results)} of {len(items)} displayed results were kept "
                     f"(at most {MAX_RICH_RESULTS}, {RICH_TOTAL_CHARS // 2**20} MiB together).")
    duration = _type(raw.get("duration_s", 0.0), (int, float), "duration_s")
    cpu = raw.get("cpu_s")  # absent from an executor that cannot measure it
    if cpu is not None:
        _type(cpu, (int, float), "cpu_s")
        # compared before float(): an int of 400 digits is valid JSON and float() would raise
        if (isinstance(cpu, float) and not math.isfinite(cpu)) or not 0 <= cpu <= MAX_CELL_CPU_S:
            raise MalformedReply(f"cpu_s {str(cpu)[:40]} (a finite number of seconds, 0 to {MAX_CELL_CPU_S:g})")
        cpu = float(cpu)
    flags = {key: _type(raw.get(key, False), bool, key)
             for key in ("timed_out", "oom_killed", "truncated", "restarted")}
    return ExecutionResult(
        stdout=clean_text(raw.get("stdout", ""), limits.text_chars, "stdout"),
        stderr=clean_text(raw.get("stderr", ""), limits.text_chars, "stderr"),
        results=results,
        error=error,
        files=_files(raw.get("files", []), limits, notes),
        duration_s=min(max(float(duration), 0.0), 1e6) if math.isfinite(duration) else 0.0,
        cpu_s=cpu,
        notes=notes,
        **flags,
    )
