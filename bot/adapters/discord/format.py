"""Discord-shaped text: what each event looks like, within Discord's message and upload limits.

Pure functions (no I/O) so the limits can be tested exactly; ``render`` does the REST calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bot.adapters.common import FENCE, code_block, sandbox_full_output, split_message, truncate_output
from bot.core.limits import human_size

MESSAGE_LIMIT = 2000  # characters of content per message
MAX_FILES = 10  # attachments per message
FILE_LIMIT = 10 * 1024 * 1024  # default upload size (servers without boosts), per request
OUTPUT_PREVIEW = 1500  # characters of an over-long output shown above its attached file
THREAD_NAME_LIMIT = 100
# "](" that would open a masked link's target: one with a scheme or "//" before its ")" (Discord
# links only URLs; Python's ``f[i](x)`` has neither and is left alone)
_MASKED_LINK = re.compile(r"\]\((?=\s*<?[^)\s]*?(?::|//))")


@dataclass(frozen=True)
class Upload:
    """A file to attach to a reply."""

    name: str
    data: bytes


def inert(text: str) -> str:
    """Masked links (``[text](url)``) shown as what they are: ``[text] (url)``, the real URL in
    plain sight instead of a link that claims to be something else. Applied everywhere, code
    included: telling where Discord's Markdown sees code takes a parser that matches its own
    exactly, and the space changes nothing a Python reader relies on (``f[i] (x)`` is a call)."""
    return _MASKED_LINK.sub("] (", text) if "](" in text else text


def stream_chunks(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Messages for a (possibly still streaming) reply. A fence the model has opened but not
    yet closed is closed for display, so the half-written code renders as code, not as raw
    backticks; room for that closing fence is kept below ``limit``. Masked links are made
    ``inert``: the model's text follows whatever the conversation (or a pasted page) asked."""
    if not text.strip():
        return []
    text = inert(text)
    chunks = split_message(text, limit - len(FENCE) - 1)
    last = chunks[-1]
    if _fence_open(last):
        chunks[-1] = last + (FENCE if last.endswith("\n") else "\n" + FENCE)
    return chunks


def _fence_open(chunk: str) -> bool:
    opened = False
    for line in chunk.splitlines():
        opened ^= line.count(FENCE) % 2 == 1
    return opened


def thread_name(prompt: str) -> str:
    """Discord thread names are one line of at most 100 characters."""
    line = " ".join(prompt.split()) or "codeloop"
    return line if len(line) <= THREAD_NAME_LIMIT else line[: THREAD_NAME_LIMIT - 1] + "…"


def header(user_mention: str, prompt: str, files: list[str]) -> str:
    """The starter message a /code thread hangs from: who asked what."""
    attached = f"\n📎 {', '.join(files)}" if files else ""
    room = MESSAGE_LIMIT - len(user_mention) - len(attached) - 4
    text = prompt if len(prompt) <= room else prompt[: room - 1] + "…"
    return inert(f"{user_mention}: {text}{attached}")


def output_message(payload: dict[str, Any]) -> tuple[str, Upload | None]:
    """An execution output: inline when it fits, otherwise a head-and-tail preview plus the
    whole text as ``output.txt`` (the message limit is far below what a cell may print)."""
    text = str(payload.get("text") or "")
    parts = ["**Output**"]
    error = payload.get("error")
    if isinstance(error, dict) and error.get("name"):
        parts.append(f"`{error['name']}`")
    if payload.get("timed_out"):
        parts.append("timed out")
    duration = payload.get("duration_s")
    if isinstance(duration, int | float) and not payload.get("skipped"):
        parts.append(f"{duration:.2f} s")
    head = " · ".join(parts)
    if not text.strip():
        return f"{head}\n*(no output)*", None
    inline = f"{head}\n{code_block(text)}"
    full = str(payload.get("full_text") or text)
    sandbox_files = sandbox_full_output(payload)  # the sandbox attaches these: no second copy
    if sandbox_files:
        where = " and ".join(f"`{n}`" for n in sandbox_files)
        if len(inline) <= MESSAGE_LIMIT:
            return f"{head} · truncated, full output in {where}\n{code_block(text)}", None
        preview = truncate_output(text, OUTPUT_PREVIEW, where).text
        return f"{head} · full output in {where}\n{code_block(preview)}", None
    if len(inline) <= MESSAGE_LIMIT and not payload.get("full_text"):
        return inline, None
    preview = truncate_output(text, OUTPUT_PREVIEW, "`output.txt`").text
    return f"{head} · {len(full):,} characters, attached\n{code_block(preview)}", Upload("output.txt",
                                                                                        full.encode())


def mention(user_id: str) -> str:
    """A user mention; the client sends no pings (AllowedMentions.none()), so it only names."""
    return f"<@{user_id}>" if user_id.isdigit() else user_id


def status_line(text: str, setup: object = None) -> str:
    """``setup``: the channel's own model and round limit (``model: big · up to 2 fixes``), if any."""
    return inert(f"⏳ {text.strip() or 'working'}…" + (f" · {setup}" if setup else ""))


def final_line(payload: dict[str, Any]) -> str:
    if payload.get("cancelled"):
        return "⏹ Stopped."
    rounds = payload.get("rounds")
    done = f" · {rounds} round{'s' if rounds != 1 else ''}" if isinstance(rounds, int) and rounds else ""
    if payload.get("setup"):
        done += inert(f" · {payload['setup']}")
    if payload.get("ok", True):
        return f"✅ Done{done}"
    return f"⚠️ Finished, but the last run failed{done}"


def error_line(payload: dict[str, Any]) -> str:
    if payload.get("kind") == "cancelled":
        return "⏹ Stopped."
    message = str(payload.get("message") or "something went wrong")
    line = inert(f"⚠️ {message}")
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 1] + "…"


def batch_uploads(uploads: list[Upload], max_files: int = MAX_FILES,
                  max_bytes: int = FILE_LIMIT) -> tuple[list[list[Upload]], list[str]]:
    """Group files into messages of at most ``max_files`` and ``max_bytes`` together; a file
    larger than ``max_bytes`` alone cannot be sent at all and becomes a note instead."""
    batches: list[list[Upload]] = []
    notes: list[str] = []
    current: list[Upload] = []
    size = 0
    for upload in uploads:
        n = len(upload.data)
        if n > max_bytes:
            notes.append(inert(f"`{upload.name}` is {human_size(n)}, over Discord's {human_size(max_bytes)} "
                               "upload limit; it stays in the session's /mnt/data."))
            continue
        if current and (len(current) == max_files or size + n > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(upload)
        size += n
    if current:
        batches.append(current)
    return batches, notes
