"""Behaviour every chat adapter shares, kept free of any platform's API.

Adapters stay thin: they translate a platform's payloads into these calls and render the
results. What lives here: allowlists, input limits (long text, empty mention, oversize or
binary uploads → a message the user can act on), cleaning request text of what cannot be
encoded, the control words (``reset``, ``stop``), splitting long replies at a platform's limit
without breaking a ``` code fence, and truncating long execution output with a pointer to the
attached full text. (Concurrent acks' enqueues share a Redis round trip in ``JobQueue`` itself.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from bot.errors import InputRejected
from bot.jobs import FULL_OUTPUT_FILES, JobKind, encodable
from bot.settings import Settings

FENCE = "```"
# A fence line we can re-open verbatim in the next chunk ("```python"); anything else re-opens as "```".
_FENCE_HEADER = re.compile(r"```[\w+#.-]*")
# An HTML entity cut in half renders as garbage (Slack escapes & < > this way).
_ENTITY_TAIL = re.compile(r"&[#\w]{0,8}$")
_HEADING = re.compile(r"#{1,6} \S|-# \S")  # a Markdown heading (Discord: also -# subtext)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")

# Executables and disk images: no analysis task needs them, and they are the usual payload of
# "run this for me" abuse. Data formats (CSV, Parquet, XLSX, images, zip…) are all welcome.
BLOCKED_EXTENSIONS = frozenset(
    {".exe", ".dll", ".so", ".dylib", ".msi", ".com", ".scr", ".bat", ".cmd", ".app", ".dmg", ".iso",
     ".img", ".apk", ".deb", ".rpm", ".jar", ".elf", ".bin"}
)
BLOCKED_MIMES = frozenset(
    {"application/x-executable", "application/x-sharedlib", "application/x-mach-binary",
     "application/x-msdownload", "application/x-dosexec", "application/vnd.microsoft.portable-executable",
     "application/x-msi", "application/x-iso9660-image", "application/x-apple-diskimage",
     "application/vnd.android.package-archive", "application/java-archive"}
)

T = TypeVar("T")


# --- who may use the bot ---------------------------------------------------------------------
def is_allowed(allowlist: Sequence[str], *ids: str | None) -> bool:
    """An empty allowlist lets everyone in; otherwise one of ``ids`` must be listed."""
    if not allowlist:
        return True
    return any(i is not None and i in allowlist for i in ids)


# --- acking bursts ----------------------------------------------------------------------------
# --- input limits ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InputLimits:
    max_chars: int
    max_upload_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(settings.max_message_chars, settings.max_upload_bytes)


@dataclass(frozen=True)
class Upload:
    """What an adapter knows about a user's file before anyone downloads it."""

    name: str
    size: int
    mime: str = "application/octet-stream"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def encodable_text(text: str) -> str:
    """``text`` with lone surrogates replaced and NUL dropped (``bot.jobs.encodable``)."""
    return encodable(text)


def safe_filename(name: str) -> str:
    """The name a file gets in the sandbox: a basename of letters, digits and ``._ -``, without
    leading or trailing dots and spaces (``evil.exe.`` is ``evil.exe``), at most 120 characters.
    Every check on a file's name runs on this, the name it will actually have."""
    base = encodable(name).replace("\\", "/").rsplit("/", 1)[-1]  # as the job will carry it (no NUL)
    base = _SAFE_NAME.sub("_", base).strip(" .") or "upload"
    return base[:120]


def check_text(text: str, limits: InputLimits, *, has_files: bool = False) -> str:
    """The request text, cleaned (``encodable_text``) and stripped; InputRejected when it is empty
    (and no files came) or too long. Adapters enqueue this return value, never the raw text."""
    text = encodable_text(text).strip()
    if not text and not has_files:
        raise InputRejected(
            "You mentioned me without a request. Ask something after the mention, e.g. "
            "\"plot y = x² for x in -5..5\", attach a CSV, or say \"reset\" for a fresh session."
        )
    if len(text) > limits.max_chars:
        raise InputRejected(
            f"Your message is {len(text):,} characters; the limit is {limits.max_chars:,}. "
            "Put long data in a file and attach it instead."
        )
    return text


def check_upload(upload: Upload, limits: InputLimits) -> None:
    """InputRejected for files we will not put in a sandbox: too big, or executable."""
    if upload.size > limits.max_upload_bytes:
        raise InputRejected(
            f"`{upload.name}` is {human_size(upload.size)}; files up to "
            f"{human_size(limits.max_upload_bytes)} are accepted. It was not uploaded to the session."
        )
    placed = safe_filename(upload.name)  # the name it would land as: "evil.exe." lands as "evil.exe"
    dot = placed.rfind(".")
    ext = placed[dot:].lower() if dot > 0 else ""
    if ext in BLOCKED_EXTENSIONS or upload.mime.lower() in BLOCKED_MIMES:
        raise InputRejected(
            f"`{upload.name}` looks like an executable or disk image ({upload.mime}); only data files "
            "(CSV, JSON, Excel, Parquet, images, text, archives…) are accepted. It was not uploaded."
        )


def partition_uploads(items: Iterable[tuple[T, Upload]], limits: InputLimits) -> tuple[list[T], list[str]]:
    """Split uploads into the accepted ones and a user message for each refused one."""
    accepted: list[T] = []
    refused: list[str] = []
    for item, upload in items:
        try:
            check_upload(upload, limits)
        except InputRejected as exc:
            refused.append(exc.user_message())
        else:
            accepted.append(item)
    return accepted, refused


def parse_control(text: str) -> tuple[JobKind, str]:
    """``reset`` or ``stop`` alone (mention already removed) are controls; anything else is a message."""
    word = encodable_text(text).strip().lower().rstrip(".!")
    if word in ("reset", "/reset", "new session"):
        return "reset", ""
    if word in ("stop", "/stop", "cancel"):
        return "stop", ""
    return "message", text.strip()


# --- rendering ---------------------------------------------------------------------------------
def code_block(code: str, language: str = "") -> str:
    """A fenced block; backtick runs inside are broken up so they cannot close the fence early."""
    body = code.replace(FENCE, "`\u200b``").rstrip("\n")
    return f"{FENCE}{language}\n{body}\n{FENCE}"


@dataclass(frozen=True)
class Truncated:
    text: str
    truncated: bool
    omitted: int = 0


def truncate_output(text: str, limit: int, attachment: str = "the attached file") -> Truncated:
    """Keep the head and tail of ``text`` within ``limit`` characters, with a note saying where the
    rest is. The tail is kept because tracebacks and final results are at the end."""
    if len(text) <= limit:
        return Truncated(text, False)
    omitted_guess = len(text) - limit
    note_len = len(_omitted_note(omitted_guess + 200, attachment))
    room = max(limit - note_len, 0)
    head, tail = room * 2 // 3, room - room * 2 // 3
    omitted = len(text) - head - tail
    kept_tail = text[len(text) - tail:] if tail else ""
    return Truncated(text[:head] + _omitted_note(omitted, attachment) + kept_tail, True, omitted)


def sandbox_full_output(payload: Mapping[str, Any]) -> list[str]:
    """The files holding a flooded cell's full output that the sandbox sends after this
    ``output`` event (``stdout.txt``, ``stderr.txt``). When there are any, the adapter attaches
    no ``output.txt`` of its own: one copy of the output, named for what it holds."""
    names = payload.get("full_output_files")
    if not payload.get("truncated") or payload.get("full_text") or not isinstance(names, list):
        return []
    return [n for n in FULL_OUTPUT_FILES if n in names]


def _omitted_note(omitted: int, attachment: str) -> str:
    return f"\n… {omitted:,} characters omitted; full output in {attachment} …\n"


def split_message(text: str, limit: int) -> list[str]:
    """Cut ``text`` into chunks of at most ``limit`` characters, at line ends where possible.

    A chunk that ends inside a code fence is closed with ``` and the next chunk re-opens it with the
    same header (```python), so every chunk renders as valid Markdown on its own.
    """
    if limit < 40:
        raise ValueError("limit too small to hold a fence and some text")
    if len(text) <= limit:
        return [text]
    chunks: list[str] = []
    buf = ""
    header: str | None = None  # the open fence's header at the end of buf, if any
    for line in text.splitlines(keepends=True):
        for piece in _pieces(line, limit - len(header or "") - 2 * len(FENCE) - 4):
            after = _fence_after(header, piece)
            closing = len(FENCE) + 1 if after is not None else 0
            if buf and len(buf) + len(piece) + closing > limit:
                carry = _orphan_heading(buf) if header is None else ""
                if carry and len(carry) + len(piece) + closing <= limit:
                    buf = buf[: -len(carry)]  # a heading goes down with the text it heads
                else:
                    carry = ""
                if header is not None:
                    buf += FENCE if buf.endswith("\n") else "\n" + FENCE
                chunks.append(buf)
                buf = (header + "\n" if header is not None else "") + carry
            buf += piece
            header = after
    if buf.strip() or not chunks:
        chunks.append(buf)
    return chunks


def _orphan_heading(buf: str) -> str:
    """The heading line (with the blank lines after it) that ``buf`` ends on, when something
    comes before it; "" otherwise."""
    body = buf.rstrip("\n")
    start = body.rfind("\n") + 1
    if start == 0 or not _HEADING.match(body[start:]) or not body[:start].strip():
        return ""
    return buf[start:]


def _pieces(line: str, size: int) -> list[str]:
    """A line too long for one chunk, cut into pieces that do not split an HTML entity."""
    size = max(size, 16)
    out: list[str] = []
    while len(line) > size:
        cut = size
        entity = _ENTITY_TAIL.search(line[:cut])
        if entity and entity.start() > 0:
            cut = entity.start()
        out.append(line[:cut])
        line = line[cut:]
    out.append(line)
    return out


def _fence_after(header: str | None, piece: str) -> str | None:
    """The open fence's header after ``piece`` (None when no fence is open)."""
    if piece.count(FENCE) % 2 == 0:
        return header
    if header is not None:
        return None
    stripped = piece.strip()
    return stripped if _FENCE_HEADER.fullmatch(stripped) else FENCE
