"""The thread's notebook record (bot/worker/thread_notebook.py) on a real file store folder."""

from __future__ import annotations

from pathlib import Path

from bot.core.jobs import Conversation, Event
from bot.worker import thread_notebook
from bot.worker.files_store import ThreadFiles

CONV = Conversation(platform="console", channel="c", thread="t")


def _job(files: ThreadFiles, job_id: str, cells: int) -> None:
    recorder = thread_notebook.recorder_for(files, "t")
    recorder.user(f"request {job_id}")
    for i in range(cells):
        recorder.event(Event(job_id=job_id, conversation=CONV, seq=2 * i, type="code", payload={"code": f"x = {i}"}))
        recorder.event(Event(job_id=job_id, conversation=CONV, seq=2 * i + 1, type="output", payload={"text": str(i)}))
    recorder.event(Event(job_id=job_id, conversation=CONV, seq=99, type="final", payload={"text": "done"}))
    thread_notebook.append(files, recorder)


def _numbers(files: ThreadFiles) -> list[int]:
    return [c["execution_count"] for c in thread_notebook.load_cells(files) if c["cell_type"] == "code"]


def test_cells_are_numbered_across_jobs_from_the_count_file_without_reading_the_notebook(tmp_path: Path) -> None:
    files = ThreadFiles(tmp_path / "thread", cap=10_000_000)
    _job(files, "a", 2)
    _job(files, "b", 1)
    assert _numbers(files) == [1, 2, 3]
    assert (files.folder / thread_notebook.COUNT).read_text() == "3"
    # the next job numbers from the count alone: the notebook is not read at a job's start
    notebook = files.folder / thread_notebook.NOTEBOOK
    saved = notebook.read_bytes()
    notebook.write_text("not json")
    assert thread_notebook.recorder_for(files, "t")._count == 3
    notebook.write_bytes(saved)
    # a missing or damaged count falls back to counting the notebook's code cells
    (files.folder / thread_notebook.COUNT).write_text("?")
    _job(files, "c", 1)
    assert _numbers(files) == [1, 2, 3, 4]
    (files.folder / thread_notebook.COUNT).unlink()
    _job(files, "d", 1)
    assert _numbers(files) == [1, 2, 3, 4, 5]
