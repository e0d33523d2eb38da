"""End to end: /code and thread messages parsed by discord.py -> Redis -> a real worker with the
scripted model and a Docker sandbox -> the reply stream -> REST calls to the fake Discord."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.adapters.common import FENCE
from tests.adapters.discord.rig import ALICE, next_job

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PLOT = """I'll build the squares and plot them.
```python
import matplotlib.pyplot as plt
xs = list(range(5))
ys = [x * x for x in xs]
plt.plot(xs, ys)
print(sum(ys))
```"""
PLOT_DONE = "The squares add up to 30; the plot is above."
FOLLOW = "```python\nprint(max(ys))\n```"
FOLLOW_DONE = "The largest square is 16."


def _thread_after(fake, thread, message_id):
    return [m for m in fake.in_channel(thread) if int(m["id"]) > int(message_id)]


def _cdn(fake, attachment):
    return fake.files[attachment["url"].split("/attachments/")[1]]


async def _done(fake, job, within=90.0):
    status_id = int(job.meta["status_message_id"])
    await fake.wait_for(lambda: "codeloop:rerun" in str(fake.messages[status_id]["components"]), within)
    return fake.messages[status_id]


async def test_code_streams_into_a_thread_and_a_follow_up_reuses_the_session(
        make_bot, start_worker, model_server, fake_discord, redis_client):
    model_server.script = [PLOT, PLOT_DONE, FOLLOW, FOLLOW_DONE]
    model_server.chunk_delay_s = 0.02  # a few delta events per reply, as from a real server
    await start_worker()
    bot, gw = await make_bot(edit_interval_s=0.3)

    slash = gw.slash(ALICE, "plot the first five squares")
    started = time.monotonic()
    gw.interaction(slash)
    await fake_discord.wait_for(lambda: fake_discord.find("POST", r"/interactions/.*/callback"))
    assert time.monotonic() - started < 3.0  # Discord's deadline for the first answer
    entry, job = await next_job(redis_client, bot.settings)
    thread = job.conversation.thread
    assert fake_discord.find("POST", rf"/channels/{fake_discord.channel_id}/messages/{thread}/threads")

    status = await _done(fake_discord, job)
    assert status["content"] == "✅ Done · 2 rounds"
    answer, output, image, final = _thread_after(fake_discord, thread, status["id"])
    assert answer["content"] == PLOT
    assert len(fake_discord.find("PATCH", rf"/channels/{thread}/messages/{answer['id']}")) >= 1  # streamed edits
    assert output["content"].startswith("**Output** · ") and output["content"].endswith("\n```\n30\n```")
    [png] = image["attachments"]
    assert png["filename"] == "figure-1.png" and _cdn(fake_discord, png).startswith(PNG_MAGIC)
    assert final["content"] == PLOT_DONE

    follow = gw.message(ALICE, thread, "what is the largest of ys?")
    gw.send_message(follow)
    _, job2 = await next_job(redis_client, bot.settings, after=entry)
    status2 = await _done(fake_discord, job2)
    assert status2["message_reference"]["message_id"] == follow["id"]
    contents = [m["content"] for m in _thread_after(fake_discord, thread, status2["id"])]
    assert contents[0] == FOLLOW and contents[1].endswith("\n```\n16\n```") and contents[2] == FOLLOW_DONE
    # the second turn carried the first one to the model
    roles = [m["role"] for m in model_server.requests[2]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]


async def test_a_5000_character_answer_and_output_are_split_and_attached(
        make_bot, start_worker, model_server, fake_discord, redis_client):
    lines = "\n".join(f"print('line {i:04d} ' + 'x' * 40)  # row {i} of the report" for i in range(92))
    reply = f"Printing the report.\n```python\n{lines}\n```"
    assert 5000 < len(reply) < 5500
    model_server.script = [reply, "All 92 lines are in the attached file."]
    await start_worker()
    bot, gw = await make_bot(edit_interval_s=0.3)
    gw.interaction(gw.slash(ALICE, "print a long report"))
    _, job = await next_job(redis_client, bot.settings)
    status = await _done(fake_discord, job)
    messages = _thread_after(fake_discord, job.conversation.thread, status["id"])
    answer = [m["content"] for m in messages[:-2]]
    assert len(answer) == 3 and all(len(c) <= 2000 for c in answer)
    assert all(sum(line.count(FENCE) for line in c.splitlines()) == 2 for c in answer)  # each fence closed
    assert answer[1].startswith("```python\n") and answer[2].startswith("```python\n")
    assert sum(c.count("print('line ") for c in answer) == 92
    output, final = messages[-2:]
    printed = "\n".join(f"line {i:04d} " + "x" * 40 for i in range(92))
    assert output["content"].startswith("**Output** · ")
    assert f"{len(printed):,} characters, attached" in output["content"]
    assert len(output["content"]) <= 2000
    [full] = output["attachments"]
    assert full["filename"] == "output.txt" and _cdn(fake_discord, full).decode().strip() == printed
    assert final["content"] == "All 92 lines are in the attached file."


async def test_stop_button_cancels_a_long_cell(make_bot, start_worker, model_server, fake_discord, redis_client):
    model_server.script = ["```python\nimport time\nfor i in range(100):\n    time.sleep(0.1)\nprint('finished')\n```",
                           "unused"]
    await start_worker(sandbox_cell_timeout_s=30.0)
    bot, gw = await make_bot(edit_interval_s=0.2)
    gw.interaction(gw.slash(ALICE, "sleep for ten seconds"))
    _, job = await next_job(redis_client, bot.settings)
    status_id = int(job.meta["status_message_id"])
    await fake_discord.wait_for(lambda: fake_discord.messages[status_id]["content"] == "⏳ running code…", 60)
    pressed = time.monotonic()
    gw.interaction(gw.button(ALICE, fake_discord.messages[status_id], f"codeloop:stop:{job.id}"))
    status = await _done(fake_discord, job, within=30)
    assert status["content"] == "⏹ Stopped."
    assert time.monotonic() - pressed < 8.0  # well before the 10 s the cell would take
    rendered = " ".join(m["content"] for m in _thread_after(fake_discord, job.conversation.thread, status_id))
    assert "finished" not in rendered.replace("print('finished')", "")


async def test_export_button_attaches_the_threads_notebook(make_bot, start_worker, model_server, fake_discord,
                                                          redis_client):
    """Export beside Re-run → an export job → the worker's .ipynb attached in the thread; nbformat
    validates it and the plot is in it. Anyone the allowlists admit may export."""
    import base64

    import nbformat

    from tests.adapters.discord.rig import BOB

    model_server.script = [PLOT, PLOT_DONE]
    await start_worker()
    bot, gw = await make_bot(edit_interval_s=0.3)
    gw.interaction(gw.slash(ALICE, "plot the first five squares"))
    _, job = await next_job(redis_client, bot.settings)
    status = await _done(fake_discord, job)
    assert f"codeloop:export:{job.id}" in str(status["components"])

    gw.interaction(gw.button(BOB, status, f"codeloop:export:{job.id}"))
    # (an export job is quick, and a finished job's entry leaves the stream: watch the thread instead)
    files: list = []
    for _ in range(600):
        files = [a for m in _thread_after(fake_discord, job.conversation.thread, status["id"])
                 for a in m["attachments"] if a["filename"].endswith(".ipynb")]
        if files:
            break
        await asyncio.sleep(0.1)
    assert [a["filename"] for a in files] == [f"{job.conversation.thread}.ipynb"]
    nb = nbformat.reads(_cdn(fake_discord, files[0]).decode(), as_version=4)
    nbformat.validate(nb)
    [code] = [c for c in nb.cells if c.cell_type == "code"]
    png = next(o.data["image/png"] for o in code.outputs if "image/png" in o.get("data", {}))
    assert base64.b64decode(png).startswith(PNG_MAGIC)
    assert any("30" in o.get("text", "") for o in code.outputs)


FLOOD = """Printing a lot.
```python
for i in range(3000):
    print(f"row {i:05d} " + "y" * 20)
```"""


async def test_a_flooded_cell_posts_one_file_with_its_full_output(
        make_bot, start_worker, model_server, fake_discord, redis_client):
    model_server.script = [FLOOD, "All rows printed."]
    await start_worker()
    bot, gw = await make_bot(edit_interval_s=0.3)
    gw.interaction(gw.slash(ALICE, "print 3000 rows"))
    _, job = await next_job(redis_client, bot.settings)
    status = await _done(fake_discord, job)
    messages = _thread_after(fake_discord, job.conversation.thread, status["id"])
    attachments = [a for m in messages for a in m["attachments"]]
    printed = "".join(f"row {i:05d} " + "y" * 20 + "\n" for i in range(3000))
    # one copy: the sandbox's stdout.txt, not a second output.txt from the adapter
    assert [a["filename"] for a in attachments] == ["stdout.txt"]
    assert _cdn(fake_discord, attachments[0]).decode() == printed
    [output] = [m["content"] for m in messages if m["content"].startswith("**Output**")]
    assert "full output in `stdout.txt`" in output and len(output) <= 2000
