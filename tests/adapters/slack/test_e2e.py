"""Slack end to end: signed Events API requests → adapter → Redis → real worker → scripted model →
Docker sandbox → reply events → the adapter's rendering at the fake Slack Web API."""

from __future__ import annotations

from typing import Any

import pytest

from tests.adapters.slack.conftest import CHANNEL, event_body, mention, message, press

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PLOT = """I'll define x and plot a line.
```python
import matplotlib.pyplot as plt
x = 21
plt.plot([1, 2, 3], [x, x + 1, x + 2])
print("x is", x)
```"""
PLOT_DONE = "x is 21 and the plot is above."
DOUBLE = """Doubling the x from before:
```python
print("doubled", x * 2)
```"""
DOUBLE_DONE = "x doubled is 42."


def done(fake: Any, ts: str) -> Any:
    return [r for r in fake.reactions if r[1] == ts]


async def test_mention_streams_code_output_and_plot_then_follow_up_reuses_the_session(
        make_rig, start_worker, model_server):
    model_server.script = [PLOT, PLOT_DONE, DOUBLE, DOUBLE_DONE]
    model_server.chunk_delay_s = 0.03  # stream over about a second, so edits are visible
    rig = await make_rig(edit_interval=0.2)
    await start_worker(slack_bot_token=rig.fake.token)
    fake = rig.fake

    first = mention("<@UBOT> define x = 21 and plot a line")
    body = event_body(first, "EvFirst")
    assert (await rig.post_event(body)).status == 200
    # Slack retries a delivery it thinks was slow: same event id, no second job or reply.
    assert (await rig.post_event(body, headers={"X-Slack-Retry-Num": "1",
                                                "X-Slack-Retry-Reason": "http_timeout"})).status == 200
    await fake.wait_for(lambda: done(fake, first["ts"]), within=120)

    thread = fake.thread(CHANNEL, first["ts"])
    status, texts = thread[0], [m["text"] for m in thread[1:]]
    assert status["text"].startswith(":white_check_mark: Done")
    joined = "\n".join(texts)
    assert "I'll define x and plot a line." in joined
    assert '```\nimport matplotlib.pyplot as plt\nx = 21' in joined
    assert "*Output*" in joined and "x is 21" in joined
    assert PLOT_DONE in texts[-1]
    first_body = thread[1]
    assert first_body["edits"] >= 2, "the reply should have been streamed with chat.update"
    [png] = [u for u in fake.uploads.values() if u.data.startswith(PNG_MAGIC)]
    assert (png.channel, png.thread_ts) == (CHANNEL, first["ts"])
    assert done(fake, first["ts"]) == [(CHANNEL, first["ts"], "white_check_mark")]
    assert await enqueued(rig) == 1
    assert len([c for c in fake.calls_to("chat.postMessage") if c.get("blocks")]) == 1  # one status message

    # A follow-up in the thread, no mention: same conversation, same Python session (x survives).
    follow = message("now double x", thread_ts=first["ts"])
    assert (await rig.post_event(event_body(follow))).status == 200
    await fake.wait_for(lambda: done(fake, follow["ts"]), within=120)
    texts = [m["text"] for m in fake.thread(CHANNEL, first["ts"])]
    assert any("doubled 42" in t for t in texts), texts
    assert any(DOUBLE_DONE in t for t in texts)
    assert done(fake, follow["ts"]) == [(CHANNEL, follow["ts"], "white_check_mark")]
    # The model saw the first exchange in the follow-up's prompt.
    last_prompt = model_server.requests[-1]["messages"]
    assert any("define x = 21" in str(m.get("content")) for m in last_prompt)
    # Bad signatures never reach the queue.
    bad = await rig.post_event(event_body(mention("<@UBOT> print(1)")), secret="not-the-secret")
    assert bad.status == 401
    assert await enqueued(rig) == 2


async def enqueued(rig: Any) -> int:
    """Jobs ever enqueued (one idempotency key each): finished jobs are deleted from the stream."""
    return len([k async for k in rig.redis.scan_iter(match=rig.settings.key("idem", "slack", "*"))])


CSV_CODE = """Reading your file.
```python
import csv
with open("/mnt/data/sales.csv") as f:
    rows = list(csv.DictReader(f))
print("total revenue", sum(int(r["revenue"]) for r in rows))
```"""


async def test_shared_csv_is_downloaded_with_the_bot_token_and_read_by_the_code(
        make_rig, start_worker, model_server):
    model_server.script = [CSV_CODE, "Total revenue is 60."]
    rig = await make_rig(edit_interval=0.2)
    # The fake's file server is on loopback, which production never downloads from: listed explicitly.
    await start_worker(slack_bot_token=rig.fake.token, download_test_hosts=rig.fake.test_host)
    fake = rig.fake
    shared = fake.add_file("sales.csv", b"month,revenue\njan,10\nfeb,20\nmar,30\n", "text/csv")
    event = mention("<@UBOT> what is the total revenue in this file?", files=[shared])
    assert (await rig.post_event(event_body(event))).status == 200
    await fake.wait_for(lambda: done(fake, event["ts"]), within=120)
    texts = "\n".join(m["text"] for m in fake.thread(CHANNEL, event["ts"]))
    assert "total revenue 60" in texts, texts
    [download] = fake.calls_to("download")
    assert download["auth"] == f"Bearer {fake.token}"
    assert done(fake, event["ts"]) == [(CHANNEL, event["ts"], "white_check_mark")]


SLOW = "Taking my time.\n```python\nimport time\ntime.sleep(6)\nprint('slept')\n```"


async def test_a_stop_stops_only_its_own_job_and_another_users_press_is_refused(make_rig, start_worker, model_server):
    """In one thread: B's Stop on A's running job is refused (A's job finishes); B's Stop on B's
    own queued job ends it before it runs, and A's running job is untouched."""
    def reply(messages):
        last = str(messages[-1]["content"])
        return "Slept well." if last.startswith("Execution result") else SLOW if "sleep" in last else "B's answer"

    model_server.script = reply
    rig = await make_rig(edit_interval=0.2)
    await start_worker(slack_bot_token=rig.fake.token)
    fake = rig.fake
    first = mention("<@UBOT> sleep a while")
    await rig.post_event(event_body(first))
    [a_status] = await fake.wait_for(lambda: [c for c in fake.calls_to("chat.postMessage") if c.get("blocks")])
    thread = lambda: fake.thread(CHANNEL, first["ts"])  # noqa: E731
    await fake.wait_for(lambda: thread() and "running code" in thread()[0]["text"], within=120)

    await rig.post_interaction(press(a_status, "U0B"))  # B presses A's Stop
    [refusal] = await fake.wait_for(lambda: fake.calls_to("chat.postEphemeral"))
    assert refusal["user"] == "U0B" and "can stop this run" in refusal["text"]

    follow = message("and then answer me", user="U0B", thread_ts=first["ts"])
    await rig.post_event(event_body(follow))  # B's request waits behind A's in the thread
    [b_status] = await fake.wait_for(lambda: [c for c in fake.calls_to("chat.postMessage")
                                              if c.get("blocks") and c is not a_status])
    await rig.post_interaction(press(b_status, "U0B"))  # B stops B's own queued request

    await fake.wait_for(lambda: done(fake, first["ts"]) and done(fake, follow["ts"]), within=120)
    assert done(fake, first["ts"]) == [(CHANNEL, first["ts"], "white_check_mark")]  # A's job ran to the end
    assert done(fake, follow["ts"]) == [(CHANNEL, follow["ts"], "black_square_for_stop")]
    texts = "\n".join(m["text"] for m in thread())
    assert "slept" in texts and "Slept well." in texts and "B's answer" not in texts
    assert not any("and then answer me" in str(r["messages"]) for r in model_server.requests)  # never ran


async def test_export_notebook_shortcut_posts_the_threads_ipynb_into_the_thread(make_rig, start_worker, model_server):
    """The "Export notebook" message shortcut → an export job → the worker builds the notebook from its
    own record → the adapter posts it with files_upload_v2 in the thread; nbformat validates it."""
    import base64

    import nbformat

    model_server.script = [PLOT, PLOT_DONE]
    rig = await make_rig()
    await start_worker(slack_bot_token=rig.fake.token)
    fake = rig.fake
    first = mention("<@UBOT> define x = 21 and plot a line")
    assert (await rig.post_event(event_body(first, "EvPlot"))).status == 200
    await fake.wait_for(lambda: done(fake, first["ts"]), within=120)

    shortcut = {"type": "message_action", "callback_id": "codeloop_export", "trigger_id": "tx",
                "team": {"id": "T0001"}, "user": {"id": "U0002"}, "channel": {"id": CHANNEL},
                "message": {"ts": first["ts"], "text": "define x"}}
    assert (await rig.post_interaction(shortcut)).status == 200
    await fake.wait_for(lambda: [u for u in fake.uploads.values() if u.filename.endswith(".ipynb") and u.channel],
                        within=60)  # completed (files.completeUploadExternal names the channel)
    [upload] = [u for u in fake.uploads.values() if u.filename.endswith(".ipynb")]
    assert (upload.channel, upload.thread_ts) == (CHANNEL, first["ts"])
    assert upload.filename == f"{first['ts']}.ipynb"
    nb = nbformat.reads(upload.data.decode(), as_version=4)
    nbformat.validate(nb)
    [code] = [c for c in nb.cells if c.cell_type == "code"]
    assert "x = 21" in code.source
    png = next(o.data["image/png"] for o in code.outputs if "image/png" in o.get("data", {}))
    assert base64.b64decode(png).startswith(PNG_MAGIC)
    assert any("x is 21" in o.get("text", "") for o in code.outputs)
    assert await enqueued(rig) == 2  # the mention and the export (finished entries leave the stream)


FLOOD = """Printing a lot.
```python
for i in range(3000):
    print(f"row {i:05d} " + "y" * 20)
```"""


async def test_a_flooded_cell_posts_one_file_with_its_full_output(make_rig, start_worker, model_server):
    model_server.script = [FLOOD, "All rows printed."]
    rig = await make_rig(edit_interval=0.2)
    await start_worker(slack_bot_token=rig.fake.token)
    fake = rig.fake
    event = mention("<@UBOT> print 3000 rows")
    assert (await rig.post_event(event_body(event))).status == 200
    await fake.wait_for(lambda: done(fake, event["ts"]), within=120)
    printed = "".join(f"row {i:05d} " + "y" * 20 + "\n" for i in range(3000))
    # one copy: the sandbox's stdout.txt, not a second output.txt from the adapter
    [upload] = [u for u in fake.uploads.values() if u.thread_ts == event["ts"]]
    assert upload.filename == "stdout.txt" and upload.data.decode() == printed
    texts = "\n".join(m["text"] for m in fake.thread(CHANNEL, event["ts"]))
    assert "full output attached as stdout.txt" in texts and "output.txt`" not in texts
    assert "row 00000" in texts and "row 02999" in texts
