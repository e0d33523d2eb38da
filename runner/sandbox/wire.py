"""The supervisor's wire (runs inside the sandbox; stdlib only): bounded request lines from the
worker, checked before use, and replies whose every string is valid Unicode.

Nothing read here may crash the supervisor: a line that is too long, not UTF-8, not JSON, nested
too deeply or not an object is dropped with a reason on stderr (the worker logs it), and a request
with a usable id but bad fields gets an error reply. What the kernel answers is the cell's own
doing (the cell runs in that process): it is checked just as strictly, since a malformed answer
must cost the cell its kernel, never the session its supervisor.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

OPS = ("run", "put", "reset", "interrupt", "ping")
MAX_ID = 128
MIMES = (
    "text/plain",
    "text/html",
    "text/markdown",
    "image/svg+xml",
    "image/png",
    "image/jpeg",
    "application/json",
)
MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
KINDS = ("execute_result", "display_data")


class LineReader:
    """Splits a byte stream into lines of at most ``limit`` bytes; a longer line is dropped whole,
    reported once as ``None``, and never held in memory beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.skipping = False

    def feed(self, chunk: bytes) -> list[bytes | None]:
        lines: list[bytes | None] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if self.skipping:
                pass
            elif len(self.buf) + len(piece) > self.limit:
                self.buf.clear()
                self.skipping = True
                lines.append(None)
            else:
                self.buf += piece
            if end < 0:
                return lines
            if not self.skipping:
                lines.append(bytes(self.buf))
            self.buf.clear()
            self.skipping = False
            start = end + 1


def clean(text: str) -> str:
    """``text`` with lone surrogates (a name that is not UTF-8, a repr that built one) as visible
    ``\\udcxx`` escapes: what the worker decodes is always strict UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_tree(value: Any, depth: int = 0) -> Any:
    """Every string in a JSON value cleaned (the supervisor's own messages: shallow, small)."""
    if isinstance(value, str):
        return clean(value)
    if depth > 20:
        raise ValueError("nested too deeply")
    if isinstance(value, dict):
        return {clean(str(k)): clean_tree(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_tree(v, depth + 1) for v in value]
    return value


def parse_request(line: bytes) -> tuple[Any, dict[str, Any] | None, str | None]:
    """(id, request, problem). No usable id: the line is dropped and ``problem`` logged; an id and
    a problem: the caller answers with an error; else the request is well-formed."""
    try:
        req = json.loads(line)
    except RecursionError:
        return None, None, "a request nested too deeply"
    except ValueError as exc:  # UnicodeDecodeError included
        return None, None, f"a request that is not JSON ({type(exc).__name__})"
    if not isinstance(req, dict):
        return None, None, f"a request that is not an object ({type(req).__name__})"
    rid = req.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or len(str(rid)) > MAX_ID:
        return None, None, "a request without a usable id"
    rid = clean(rid) if isinstance(rid, str) else rid
    op = req.get("op")
    if op not in OPS:
        return rid, None, f"unknown op {clean(str(op))[:40]!r}"
    if op == "run":
        timeout = req.get("timeout")
        if not isinstance(req.get("code", ""), str):
            return rid, None, "run: code must be a string"
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or not 0 < timeout <= 86400
        ):
            return rid, None, "run: timeout must be a number of seconds in (0, 86400]"
    if op == "put" and not (isinstance(req.get("name"), str) and isinstance(req.get("data"), str)):
        return rid, None, "put: name and data must be strings"
    return rid, req, None


def check_done(
    msg: Any, n: int, text_cap: int, limit: int
) -> tuple[list[dict[str, Any]], dict[str, str] | None, list[str]]:
    """The kernel's answer to cell ``n`` as (results, error, notes), cleaned; ValueError when it is
    not one, or when it would take more than ``limit`` bytes in the reply. Results keep only known
    MIME types; an image whose bytes are not a PNG / JPEG is dropped with a note (the worker
    would refuse it)."""
    if not isinstance(msg, dict) or msg.get("t") != "done" or msg.get("n") != n:
        raise ValueError("not the answer to this cell")
    raw_results, raw_error, raw_notes = msg.get("results"), msg.get("error"), msg.get("notes", [])
    if not isinstance(raw_results, list) or not isinstance(raw_notes, list):
        raise ValueError("results and notes must be lists")
    notes = [clean(note)[:1000] for note in raw_notes[:10] if isinstance(note, str)]
    results: list[dict[str, Any]] = []
    bad_images = 0
    for item in raw_results:
        if not isinstance(item, dict) or item.get("kind") not in KINDS or not isinstance(item.get("data"), dict):
            raise ValueError("a result is not a MIME bundle")
        data: dict[str, str] = {}
        for mime, value in item["data"].items():
            if mime not in MIMES or not isinstance(value, str):
                continue
            if mime in MAGIC and not _is_image(value, MAGIC[mime]):
                bad_images += 1
                continue
            data[mime] = clean(value)
        if data:
            results.append({"kind": item["kind"], "data": data})
    if bad_images:
        notes.append(f"{bad_images} images were not returned: their data is not a valid PNG or JPEG.")
    error = None
    if raw_error is not None:
        if not isinstance(raw_error, dict) or not all(
            isinstance(raw_error.get(key), str) for key in ("name", "value", "traceback")
        ):
            raise ValueError("a malformed error")
        error = {
            "name": clean(raw_error["name"])[:200],
            "value": clean(raw_error["value"])[: text_cap + 200],
            "traceback": clean(raw_error["traceback"])[: text_cap + 200],
        }
    if len(json.dumps([results, error, notes])) > limit:  # raw UTF-8 in, \u escapes out: it can grow
        raise ValueError("more than a cell may answer")
    return results, error, notes


def _is_image(value: str, magic: bytes) -> bool:
    try:
        return base64.b64decode(value, validate=True).startswith(magic)
    except (binascii.Error, ValueError):
        return False


class Streamable(Protocol):
    name: str

    def stream(self, write: Any, sep: bytes = b"") -> bool: ...


class Writer:
    """Buffered, blocking writes to the attach stream (a reply may be streamed in pieces)."""

    def __init__(self, fd: int = 1) -> None:
        self.fd, self.buf = fd, bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self.buf)
        while view:
            view = view[os.write(self.fd, view) :]
        view.release()
        self.buf.clear()


def send(msg: dict[str, Any]) -> None:
    """One reply line (every string cleaned)."""
    writer = Writer()
    writer.write((json.dumps(clean_tree(msg)) + "\n").encode())
    writer.flush()


def send_result(rid: Any, res: dict[str, Any], files: Sequence[Streamable], notes: list[str]) -> None:
    """A run reply whose files are streamed straight from memory or /mnt/data: the supervisor
    never holds more than one chunk of them encoded. ``res`` is already clean; files and notes
    come last, so a file that vanished meanwhile can still get its note."""
    head = json.dumps({"id": rid, "ok": True, "result": res})
    writer = Writer()
    writer.write(head[:-2].encode() + b', "files": [')
    written = 0
    for item in files:
        if item.stream(writer.write, b", " if written else b""):
            written += 1
        else:
            notes.append(f"{item.name} changed while it was being returned and was left out.")
    writer.write(b'], "notes": ' + json.dumps([clean(n) for n in notes]).encode() + b"}}\n")
    writer.flush()
