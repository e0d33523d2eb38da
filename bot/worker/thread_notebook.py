"""A thread's notebook as the worker keeps it, so any adapter replica can export it (issue 16 item 6).

Each message job records its cells (``bot.core.notebook.NotebookRecorder`` fed with the job's own events)
and appends them to ``notebook.json`` in the thread's folder of the file store (bot/worker/files_store.py):
the same isolation, cap, expiry and reset as the thread's files. An ``export`` job answers with the
validated .ipynb as a ``file`` event; Slack posts it into the thread, Discord attaches it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from bot.core.notebook import NotebookRecorder, dumps, nbformat, to_notebook
from bot.worker.files_store import ThreadFiles

NOTEBOOK = "notebook.json"
#: the number of code cells in notebook.json, written with it, so a job numbers its cells without
#: reading the whole notebook (which may be megabytes of images) at its start
COUNT = "notebook.count"
DROPPED = "[image dropped: this thread's notebook is over its size cap]"


def _path(files: ThreadFiles) -> str:
    return os.path.join(files.folder, NOTEBOOK)


def load_cells(files: ThreadFiles) -> list[Any]:
    try:
        with open(_path(files), "rb") as fh:
            cells = json.load(fh)
    except (OSError, ValueError):
        return []
    return [nbformat.from_dict(cell) for cell in cells] if isinstance(cells, list) else []


def _code_cells(cells: list[Any]) -> int:
    return sum(1 for cell in cells if cell.get("cell_type") == "code")


def recorder_for(files: ThreadFiles, title: str) -> NotebookRecorder:
    """A recorder that numbers its code cells after the thread's earlier ones (from the count file;
    the notebook itself is read only when the count is missing or unreadable)."""
    recorder = NotebookRecorder(title=title)
    try:
        recorder._count = int((files.folder / COUNT).read_text())
    except (OSError, ValueError):
        recorder._count = _code_cells(load_cells(files))
    return recorder


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def append(files: ThreadFiles, recorder: NotebookRecorder) -> None:
    """Add a job's cells to the thread's notebook; over the thread's cap, the oldest images go first."""
    if not recorder.cells:
        return
    cells = load_cells(files) + list(recorder.cells)
    total = len(json.dumps(cells))
    for cell in cells:  # a list's JSON grows and shrinks by exactly its items' own: no re-dump of the whole
        if total <= files.cap:
            break
        before = len(json.dumps(cell))
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            if any(mime.startswith("image/") for mime in data):
                out["data"] = {"text/plain": DROPPED}
        total += len(json.dumps(cell)) - before
    files.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(_path(files), json.dumps(cells))
    # written second: a crash between the two leaves the count one job behind (cell numbers repeat, nothing else)
    _write(os.path.join(files.folder, COUNT), str(_code_cells(cells)))


def export(files: ThreadFiles, title: str) -> bytes | None:
    """The thread as a validated nbformat v4 notebook (None when nothing was recorded)."""
    cells = load_cells(files)
    if not cells:
        return None
    return dumps(to_notebook(cells, title)).encode()


def file_name(title: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in title).strip("-.") or "thread"
    return f"{safe[-80:]}.ipynb"
