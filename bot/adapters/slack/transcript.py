"""A job's Events folded into Slack message text, section by section.

A *section* is a run of text that renders into one or more consecutive messages. An uploaded
file or image closes the current section, so text that streams in afterwards lands below the
upload instead of growing a message above it — the thread reads in the order things happened.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from bot.adapters.common import code_block, sandbox_full_output, split_message, truncate_output
from bot.adapters.slack.markdown import escape as escape  # re-exported: adapters escape with it
from bot.adapters.slack.markdown import to_mrkdwn
from bot.core.jobs import Event
from bot.queue.blobs import missing_note

#: Slack cuts messages near 4,000 characters in practice (msg_too_long); stay below.
MESSAGE_LIMIT = 3900
#: Output shown inline; more than this goes to an attached file.
OUTPUT_LIMIT = 2500


@dataclass
class Part:
    kind: str  # text | code | output | error
    text: str
    round: int = 0

    def render(self) -> str:
        if self.kind == "text":
            return to_mrkdwn(self.text.strip())  # escaped there
        return self.text  # code, output and error parts are escaped when built


@dataclass
class Section:
    parts: list[Part] = field(default_factory=list)
    #: (ts, text) of the messages this section is shown in, in order
    sent: list[tuple[str, str]] = field(default_factory=list)

    def chunks(self) -> list[str]:
        body = "\n\n".join(r for p in self.parts if (r := p.render()))
        return split_message(body, MESSAGE_LIMIT) if body else []


@dataclass
class Attach:
    """A file to upload into the thread (an image, a file, or full output). ``blob``: the Redis
    key holding its bytes, taken just before the upload (``bot.queue.blobs``); ``data`` is empty then."""

    name: str
    data: bytes
    mime: str
    comment: str | None = None
    blob: str | None = None


class Transcript:
    def __init__(self) -> None:
        self.sections: list[Section] = [Section()]
        self.status = ""

    def dump(self) -> dict[str, Any]:
        """What rebuilds this transcript (``load``): another adapter replica may carry the job on."""
        return {"status": self.status,
                "sections": [{"parts": [[p.kind, p.text, p.round] for p in s.parts],
                              "sent": [[ts, text] for ts, text in s.sent]} for s in self.sections]}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Transcript:
        transcript = cls()
        transcript.status = str(data.get("status") or "")
        sections = [Section([Part(str(k), str(t), int(r)) for k, t, r in s.get("parts", [])],
                            [(str(ts), str(text)) for ts, text in s.get("sent", [])])
                    for s in data.get("sections", [])]
        transcript.sections = sections or [Section()]
        return transcript

    @property
    def current(self) -> Section:
        return self.sections[-1]

    def seal(self) -> None:
        """Start a new section (after an upload), unless the current one is still empty."""
        if self.current.parts:
            self.sections.append(Section())

    def _text_part(self, round_: int) -> Part | None:
        for section in reversed(self.sections):
            for part in reversed(section.parts):
                if part.kind == "text" and part.round == round_:
                    return part
        return None

    def apply(self, event: Event) -> Attach | None:
        """Fold ``event`` in; returns a file to upload when the event brings one."""
        p: dict[str, Any] = event.payload
        if event.type == "status":
            # ``setup``: the channel's own model and round limit, where they differ from the defaults
            self.status = " · ".join(str(v) for v in (p.get("text"), p.get("setup")) if v)
        elif event.type == "delta":
            self._delta(str(p.get("text") or ""), int(p.get("round") or 0))
        elif event.type == "code":
            code, round_ = str(p.get("code") or ""), int(p.get("round") or 0)
            said = self._text_part(round_)
            # The model's own reply normally carries the code in a fence already; don't show it twice.
            if code.strip() and (said is None or code.strip() not in said.text):
                block = code_block(escape(code))  # Slack shows a language tag as a line of code
                self.current.parts.append(Part("code", block, round_))
        elif event.type == "output":
            return self._output(p)
        elif event.type in ("image", "file"):
            if p.get("skipped"):
                self.note(missing_note(p))
            return _attachment(p)
        elif event.type == "final":
            self._final(p)
        elif event.type == "error":
            message = escape(str(p.get("message") or "Failed."))
            self.current.parts.append(Part("error", f":warning: {message}"))
        return None

    def note(self, text: str) -> None:
        """A warning line in the reply (a file that could not be shown, and why)."""
        self.current.parts.append(Part("error", f":warning: {escape(text)}"))

    def _delta(self, text: str, round_: int) -> None:
        last = self.current.parts[-1] if self.current.parts else None
        if last is not None and last.kind == "text" and last.round == round_:
            last.text += text
        elif text:
            self.current.parts.append(Part("text", text, round_))

    def _output(self, p: dict[str, Any]) -> Attach | None:
        text = str(p.get("text") or "")
        full = str(p.get("full_text") or text)
        sandbox_files = sandbox_full_output(p)  # the sandbox attaches these: no second copy
        where = " and ".join(sandbox_files) or "output.txt"
        shown = truncate_output(text, OUTPUT_LIMIT, where)
        attach = None
        notes = []
        if sandbox_files:
            notes.append(f"truncated; full output attached as {where}")
        elif shown.truncated or (p.get("truncated") and p.get("full_text")):
            attach = Attach("output.txt", full.encode(), "text/plain", "Full output")
            notes.append("truncated; full output attached")
        elif p.get("truncated"):
            notes.append("truncated")
        if p.get("timed_out"):
            notes.append("timed out")
        duration = p.get("duration_s")
        if isinstance(duration, int | float):
            notes.append(f"{duration:.1f} s")
        header = "*Output*" + (f" _({', '.join(notes)})_" if notes else "")
        body = code_block(escape(shown.text)) if shown.text.strip() else "_(no output)_"
        self.current.parts.append(Part("output", f"{header}\n{body}"))
        return attach

    def _final(self, p: dict[str, Any]) -> None:
        text = str(p.get("text") or "")
        if not text.strip():
            return
        round_ = int(p.get("rounds") or 0)
        part = self._text_part(round_) or self._last_text()
        # The final reply is authoritative: it repairs deltas lost to a restart or never streamed.
        if part is not None and text.strip().startswith(part.text.strip()[:50]):
            part.text = text
        elif part is None or text.strip() not in part.text:
            self.current.parts.append(Part("text", text, round_))

    def _last_text(self) -> Part | None:
        for section in reversed(self.sections):
            for part in reversed(section.parts):
                if part.kind == "text":
                    return part
        return None


def _attachment(p: dict[str, Any]) -> Attach | None:
    name, mime = str(p.get("name") or "file"), str(p.get("mime") or "application/octet-stream")
    if p.get("skipped"):
        return None
    if isinstance(p.get("blob"), str):
        return Attach(name, b"", mime, blob=p["blob"])
    try:
        data = base64.b64decode(str(p.get("data_b64") or ""), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not data:
        return None
    return Attach(name, data, mime)
