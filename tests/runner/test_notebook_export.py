"""Exporting a thread as a notebook from the worker's own record (issue 16 item 6): an ``export``
job, from any adapter, is answered with the .ipynb as a file event; nbformat validates it and the
plot is in it."""

from __future__ import annotations

import base64
import json
from typing import Any

import nbformat
import redis.asyncio as aioredis

from bot.queue.stream import JobQueue
from tests.runner.test_files_persist import ask, conv

PLOT = ("```python\nimport matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\nplt.show()\nprint('plotted')\n```")
FAIL = "```python\n1 / 0\n```"


def script(messages: list[dict[str, Any]]) -> str:
    last = str(messages[-1]["content"])
    if last.startswith("Execution result"):
        return "Here is the chart."
    return FAIL if last.startswith("fail") else PLOT


async def exported(redis: aioredis.Redis, reply: str, job_id: str) -> dict[str, Any]:
    from bot.core.jobs import Event

    for _, fields in await redis.xrange(reply):
        event = Event.loads(fields[b"event"])
        if event.job_id == job_id and event.type == "file":
            return event.payload
    raise AssertionError("no file event")


async def test_an_export_job_answers_with_a_valid_notebook_holding_the_plot(
        start_worker: Any, model_server: Any, redis_client: aioredis.Redis) -> None:
    model_server.script = script
    worker = await start_worker()
    queue, reply = JobQueue(redis_client, worker.settings), "replies:export"
    empty = await ask(queue, redis_client, "N", "export", reply, kind="export")
    assert empty.type == "final" and "Nothing to export yet" in empty.payload["text"]

    await ask(queue, redis_client, "N", "plot y = x^2", reply)
    await ask(queue, redis_client, "N", "fail please", reply)
    final = await ask(queue, redis_client, "N", "export", reply, kind="export")
    assert final.type == "final" and final.payload.get("export") is True
    payload = await exported(redis_client, reply, final.job_id)
    assert payload["name"] == f"{conv('N').thread}.ipynb" and payload["mime"] == "application/x-ipynb+json"
    raw = await redis_client.get(payload["blob"])  # file bytes travel as a blob, never in the stream
    assert raw is not None
    nb = nbformat.reads(raw.decode(), as_version=4)
    nbformat.validate(nb)
    kinds = [cell.cell_type for cell in nb.cells]
    assert kinds.count("code") == 2 and kinds[0] == "markdown"
    plot, fail = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert (plot.execution_count, fail.execution_count) == (1, 2)  # numbered across jobs
    assert any("image/png" in out.get("data", {}) for out in plot.outputs)
    assert base64.b64decode(next(o.data["image/png"] for o in plot.outputs if "data" in o))[:4] == b"\x89PNG"
    assert any(out.output_type == "error" and out.ename == "ZeroDivisionError" for out in fail.outputs)
    assert "**User:** plot y = x^2" in nb.cells[0].source
    state = json.loads(await redis_client.get(worker.settings.key("conv", conv("N").key, "state")) or "{}")
    assert state["jobs"] == 2  # an export leaves the conversation as it was
