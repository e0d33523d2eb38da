"""A chat thread as a Jupyter notebook (nbformat v4), built from the thread's events.

The user's messages and the model's text become markdown cells; each executed cell becomes a code
cell with its outputs: the printed text as a ``stream``, an error as an ``error`` output (name,
value, the Jupyter-format traceback lines), each image as ``display_data`` with ``image/png`` or
``image/jpeg``. Any front end that sees the events (the console, an adapter) can record them;
:func:`to_notebook` checks the result against nbformat's schema.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

import nbformat as _nbformat
from nbformat import v4 as _v4

from bot.core.jobs import Event

# nbformat is untyped: used through Any
nbformat: Any = _nbformat
v4: Any = _v4

#: the model's code block, shown as the code cell that follows instead of twice
_FENCE = re.compile(r"```(?:python|py)?\s*\n.*?```", re.S)
IMAGE_MIMES = ("image/png", "image/jpeg")


@dataclass
class NotebookRecorder:
    """Collects one thread's messages and executed cells, in order."""

    title: str = ""
    cells: list[Any] = field(default_factory=list)
    _text: dict[str, list[str]] = field(default_factory=dict)  # a job's model text, per round
    _cell: Any = None
    _count: int = 0

    def user(self, text: str) -> None:
        if text.strip():
            self.cells.append(v4.new_markdown_cell(f"**User:** {text.strip()}"))

    def event(self, event: Event, data: bytes | None = None) -> None:
        """Record one reply event; ``data``: the bytes of an image event whose payload carries a
        blob reference instead of inline base64 (``bot.queue.blobs``)."""
        p = event.payload
        if event.type == "delta":
            self._text.setdefault(event.job_id, []).append(str(p.get("text", "")))
        elif event.type == "code":
            self._flush_text(event.job_id)
            self._count += 1
            self._cell = v4.new_code_cell(str(p.get("code", "")), execution_count=self._count)
            self.cells.append(self._cell)
        elif event.type == "output" and self._cell is not None:
            self._cell.outputs.extend(_outputs(p))
        elif event.type == "image" and self._cell is not None:
            mime = str(p.get("mime", "image/png"))
            b64 = base64.b64encode(data).decode() if data is not None else str(p.get("data_b64", ""))
            if mime in IMAGE_MIMES and _is_base64(b64):
                self._cell.outputs.append(v4.new_output("display_data", data={mime: b64, "text/plain": "<Figure>"}))
        elif event.type == "final":
            if not self._flush_text(event.job_id) and str(p.get("text", "")).strip():
                self.cells.append(v4.new_markdown_cell(f"**Assistant:** {str(p['text']).strip()}"))
            self._cell = None

    def _flush_text(self, job_id: str) -> bool:
        text = _FENCE.sub("", "".join(self._text.pop(job_id, []))).strip()
        if text:
            self.cells.append(v4.new_markdown_cell(f"**Assistant:** {text}"))
        return bool(text)

    def notebook(self) -> Any:
        return to_notebook(self.cells, self.title)


def _outputs(payload: dict[str, Any]) -> list[Any]:
    text = str(payload.get("text") or "")
    error = payload.get("error")
    if isinstance(error, dict):
        name, value = str(error.get("name", "Error")), str(error.get("value", ""))
        # the chat text ends with the traceback (Jupyter's format already); what came before it
        # is the cell's printed output
        start = text.find("-" * 20)
        printed, tb = (text[:start], text[start:]) if start >= 0 else ("", text)
        outs = [v4.new_output("stream", name="stdout", text=printed)] if printed.strip() else []
        return [*outs, v4.new_output("error", ename=name, evalue=value, traceback=tb.splitlines())]
    return [v4.new_output("stream", name="stdout", text=text)] if text else []


def _is_base64(data: str) -> bool:
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    return bool(data)


def to_notebook(cells: list[Any], title: str = "") -> Any:
    """A validated nbformat v4 notebook of ``cells``; nbformat.ValidationError if it is not one."""
    nb = v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    if title:
        nb.metadata["codeloop"] = {"thread": title}
    nbformat.validate(nb)
    return nb


def dumps(nb: Any) -> str:
    return str(nbformat.writes(nb))
