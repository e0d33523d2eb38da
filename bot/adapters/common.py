"""Behaviour every chat adapter shares, kept free of any platform's API.

Adapters stay thin: they translate a platform's payloads into these calls and render the
results. What lives here: allowlists, the control words (``reset``, ``stop``), splitting long
replies at a platform's limit without breaking a ``` code fence, and truncating long execution
output with a pointer to the attached full text. Input limits (long text, empty mention, oversize or binary uploads) are
``bot.core.limits``: the worker applies them too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.core.jobs import FULL_OUTPUT_FILES, JobKind
from bot.core.limits import encodable_text

FENCE = "```"
# A fence line we can re-open verbatim in the next chunk ("```python"); anything else re-opens as "```".
_FENCE_HEADER = re.compile(r"```[\w+#.-]*")
# An HTML entity cut in half renders as garbage (Slack escapes & < > this way).
_ENTITY_TAIL = re.compile(r"&[#\w]{0,8}$")
_HEADING = re.compile(r"#{1,6} \S|-# \S")  # a Markdown heading (Discord: also -# subtext)


# --- who may use the bot ---------------------------------------------------------------------
def is_allowed(allowlist: Sequence[str], *ids: str | None) -> bool:
    """An empty allowlist lets everyone in; otherwise one of ``ids`` must be listed."""
    if not allowlist:
        return True
    return any(i is not None and i in allowlist for i in ids)


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
