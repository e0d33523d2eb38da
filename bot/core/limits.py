"""Input limits every way into the bot enforces, kept here so the adapters (at intake) and the
worker (again, before a file reaches a sandbox) apply the same rules: long text, empty requests,
oversize or executable uploads, and the name a file will have in the sandbox."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from bot.core.errors import InputRejected
from bot.core.jobs import encodable
from bot.core.settings import Settings

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
    """``text`` with lone surrogates replaced and NUL dropped (``bot.core.jobs.encodable``)."""
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
