"""The whole loop through real parts: console -> Redis -> worker -> scripted model -> Docker sandbox."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.adapters.console import Console
from bot.core.jobs import Event
from bot.core.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BROKEN = """I'll compute the mean and plot it.
```python
import matplotlib.pyplot as plt
values = [3, 5, 7]
mean = sum(values) / len(valuez)
plt.plot(values)
print("mean", mean)
```"""

FIXED = """There was a typo in the variable name. Fixed:
```python
mean = sum(values) / len(values)
plt.plot(values)
print("mean", mean)
```"""

DONE = "The mean is 5.0 and the plot is above."


class Recorder(Console):
    """The real console with its events kept for assertions (rendering still runs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[Event] = []
        render = self.renderer.render

        def keep(event: Event, data: bytes | None = None) -> None:
            self.events.append(event)
            render(event, data)

        self.renderer.render = keep  # type: ignore[method-assign]


async def test_failing_code_is_fed_back_and_fixed(start_worker: Any, model_server: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model_server.script = [BROKEN, FIXED, DONE]
    worker = await start_worker()
    console = Recorder(worker.settings, None, tmp_path, interactive=False)
    await console.connect()
    try:
        await asyncio.wait_for(console.send("compute the mean of 3, 5, 7 and plot it"), timeout=90)
    finally:
        await console.close()
    types = [e.type for e in console.events]
    assert types[-1] == "final" and "error" not in types
    outputs = [e.payload for e in console.events if e.type == "output"]
    assert "NameError" in outputs[0]["text"] and outputs[0]["error"]["name"] == "NameError"
    assert outputs[1]["text"].strip() == "mean 5.0" and outputs[1]["error"] is None
    images = [e for e in console.events if e.type == "image"]
    # the image travelled as a blob reference, never as bytes on the reply stream
    assert len(images) == 1 and "data_b64" not in images[0].payload and images[0].payload["blob"]
    assert console.events[-1].payload["rounds"] == 3 and console.events[-1].payload["text"] == DONE
    assert [e.seq for e in console.events] == list(range(1, len(console.events) + 1))
    # what the model saw: the traceback as an "Execution result:" turn, then the fixed output
    second, third = model_server.requests[1]["messages"], model_server.requests[2]["messages"]
    assert second[0]["role"] == "system"
    assert second[-1]["role"] == "user" and second[-1]["content"].startswith("Execution result:\n")
    assert "NameError: name 'valuez' is not defined" in second[-1]["content"]
    assert third[-1]["content"].startswith("Execution result:\nmean 5.0")
    assert "[image figure-1.png shown to the user]" in third[-1]["content"]
    saved = list((tmp_path / console.conversation.thread).glob("figure-*.png"))
    assert len(saved) == 1 and saved[0].read_bytes().startswith(PNG_MAGIC)
    assert "[final] done in 3 round(s)" in capsys.readouterr().out


async def test_export_writes_a_valid_notebook_with_the_plot(start_worker: Any, model_server: Any,
                                                             tmp_path: Path) -> None:
    import nbformat

    model_server.script = [BROKEN, FIXED, DONE]
    worker = await start_worker()
    console = Recorder(worker.settings, None, tmp_path, interactive=False)
    await console.connect()
    try:
        await asyncio.wait_for(console.handle_line("compute the mean of 3, 5, 7 and plot it"), timeout=90)
        await console.handle_line("/export")
    finally:
        await console.close()
    # the model read the error in Jupyter's format (IPython in the sandbox)
    feedback = model_server.requests[1]["messages"][-1]["content"]
    assert "Cell In[1], line 3" in feedback and "----> 3 mean = sum(values) / len(valuez)" in feedback
    assert "\x1b" not in feedback
    thread = console.conversation.thread
    path = tmp_path / thread / f"{thread}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds == ["markdown", "markdown", "code", "markdown", "code", "markdown"]
    assert nb.cells[0].source == "**User:** compute the mean of 3, 5, 7 and plot it"
    assert nb.cells[1].source == "**Assistant:** I'll compute the mean and plot it."
    broken, fixed = nb.cells[2], nb.cells[4]
    assert "len(valuez)" in broken.source and broken.execution_count == 1
    assert [o.output_type for o in broken.outputs] == ["error"]
    assert broken.outputs[0].ename == "NameError" and any("Cell In[1]" in line for line in broken.outputs[0].traceback)
    assert [o.output_type for o in fixed.outputs] == ["stream", "display_data"]
    assert fixed.outputs[0].text.strip() == "mean 5.0"
    assert base64.b64decode(fixed.outputs[1].data["image/png"]).startswith(PNG_MAGIC)
    assert nb.cells[5].source == f"**Assistant:** {DONE}"


async def test_follow_up_uses_the_same_python_session(start_worker: Any, model_server: Any, tmp_path: Path) -> None:
    model_server.script = ["```python\nsecret = 41 + 1\nprint('set')\n```", "Set it.",
                           "```python\nprint(secret * 2)\n```", "It is 84."]
    worker = await start_worker()
    console = Recorder(worker.settings, None, tmp_path, interactive=False)
    await console.connect()
    try:
        await asyncio.wait_for(console.send("set a variable"), timeout=60)
        await asyncio.wait_for(console.send("double it"), timeout=60)
    finally:
        await console.close()
    outputs = [e.payload["text"] for e in console.events if e.type == "output"]
    assert outputs == ["set", "84"]
    # the follow-up carried the whole conversation to the model
    history = model_server.requests[2]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant", "user"]


async def test_input_calls_are_not_run_and_empty_output_is_nudged(start_worker: Any, model_server: Any,
                                                                  tmp_path: Path) -> None:
    model_server.script = ["```python\nname = input('name?')\n```", "```python\nx = 1\n```", "ok"]
    worker = await start_worker()
    console = Recorder(worker.settings, None, tmp_path, interactive=False)
    await console.connect()
    try:
        await asyncio.wait_for(console.send("greet me"), timeout=60)
    finally:
        await console.close()
    fb1 = model_server.requests[1]["messages"][-1]["content"]
    fb2 = model_server.requests[2]["messages"][-1]["content"]
    assert "calls input()" in fb1
    assert "ran without printing anything" in fb2


async def test_reset_starts_a_fresh_session(start_worker: Any, model_server: Any, tmp_path: Path) -> None:
    model_server.script = ["```python\nkept = 1\n```", "ok", "```python\nprint(kept)\n```", "gone"]
    worker = await start_worker()
    console = Recorder(worker.settings, None, tmp_path, interactive=False)
    await console.connect()
    try:
        await asyncio.wait_for(console.send("remember"), timeout=60)
        await asyncio.wait_for(console.send("", kind="reset"), timeout=60)
        await asyncio.wait_for(console.send("print it"), timeout=60)
    finally:
        await console.close()
    outputs = [e.payload for e in console.events if e.type == "output"]
    assert outputs[-1]["error"]["name"] == "NameError"
    assert model_server.requests[2]["messages"][1]["content"] == "print it"  # history was cleared


async def test_console_cli_with_piped_stdin(model_server: Any, make_settings: Any, key_prefix: str,
                                            tmp_path: Path) -> None:
    """`codeloop console` as a user runs it: one message per line, exits after the last final."""
    model_server.script = ["```python\nprint(6 * 7)\n```", "The answer is 42."]
    settings: Settings = make_settings(llm_url=model_server.url)
    env = {**os.environ, "CODELOOP_REDIS_URL": settings.redis_url, "CODELOOP_KEY_PREFIX": key_prefix,
           "CODELOOP_LLM_URL": model_server.url, "CODELOOP_SANDBOX_POOL_SIZE": "0",
           "CODELOOP_SANDBOX_IMAGE": settings.sandbox_image}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "console", "--out", str(tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(b"what is 6 times 7?\n"), timeout=120)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "[output]\n42" in text and "The answer is 42." in text and "[final] done in 2 round(s)" in text
    # the subprocess's sandbox is not labelled for this test: remove it by the session id it stored
    import json

    import docker
    import redis

    r = redis.from_url(settings.redis_url)
    sessions = [json.loads(r.get(k) or "{}").get("session_id") for k in r.scan_iter(f"{key_prefix}:conv:*:state")]
    r.close()
    assert sessions and all(sessions)
    client = docker.from_env()
    for session_id in sessions:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(session_id).remove(force=True)
    client.close()
