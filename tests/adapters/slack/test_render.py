"""Rendering worker Events into a Slack thread, observed at the fake Web API."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time

from bot.core.jobs import Event
from bot.queue.stream import JobQueue
from tests.adapters.slack.conftest import CHANNEL, event_body, mention

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def start_job(rig, text="<@UBOT> print 1+1"):
    """Mention the bot; return the event, its job, and ``emit`` to publish that job's Events."""
    before = len(await rig.jobs())
    event = mention(text)
    await rig.post_event(event_body(event))
    job = (await rig.jobs())[before]
    await rig.fake.wait_for(lambda: rig.fake.thread(CHANNEL, event["ts"]))
    queue = JobQueue(rig.redis, rig.settings)
    seq = 0

    async def emit(type_, **payload):
        nonlocal seq
        seq += 1
        await queue.publish(job.reply_stream, Event(job_id=job.id, conversation=job.conversation, seq=seq,
                                                    type=type_, payload=payload, meta=job.meta))

    return event, job, emit


def fences_balanced(text):
    return text.count("```") % 2 == 0


async def test_streamed_reply_code_output_image_and_final_status(make_rig):
    rig = await make_rig(edit_interval=0.3)
    event, _job, emit = await start_job(rig)
    fake = rig.fake
    reply = "Let me compute it.\n```python\nimport math\nprint(math.pi)\n```"
    await emit("status", text="Thinking…")
    for i in range(0, len(reply), 5):
        await emit("delta", text=reply[i:i + 5], round=0)
        await asyncio.sleep(0.01)
    await emit("code", code="import math\nprint(math.pi)", language="python", round=0)
    await emit("output", text="3.141592653589793 <class 'float'>\n", truncated=False, error=None,
               timed_out=False, duration_s=0.01)
    await emit("image", name="plot.png", mime="image/png", data_b64=base64.b64encode(PNG).decode())
    await emit("delta", text="Pi is about 3.14159.", round=1)
    await emit("final", text="Pi is about 3.14159.", rounds=1, ok=True)

    await fake.wait_for(lambda: ("C0001", event["ts"], "white_check_mark") in fake.reactions)
    thread = fake.thread(CHANNEL, event["ts"])
    status, body = thread[0], [m["text"] for m in thread[1:]]
    assert status["text"] == ":white_check_mark: Done (1 round)"
    assert all(b["type"] != "actions" for b in status["blocks"])  # Stop button gone
    assert body[0].startswith("Let me compute it.\n```\nimport math\nprint(math.pi)\n```")
    assert body[0].count("print(math.pi)") == 1  # the code event did not repeat the fenced code
    assert "*Output*" in body[0] and "3.141592653589793 &lt;class 'float'&gt;" in body[0]
    assert body[1] == "Pi is about 3.14159."  # after the image, in its own message below it
    [upload] = fake.uploads.values()
    assert upload.data == PNG and upload.filename == "plot.png"
    assert (upload.channel, upload.thread_ts) == (CHANNEL, event["ts"])
    # The upload lands between the two text messages.
    order = [c.method for c in fake.calls if c.method in ("files.completeUploadExternal", "chat.postMessage")]
    assert order[-2:] == ["files.completeUploadExternal", "chat.postMessage"]


async def test_edits_are_throttled_per_message(make_rig):
    rig = await make_rig(edit_interval=0.5)
    event, _job, emit = await start_job(rig)
    started = time.monotonic()
    for i in range(60):  # 60 deltas over ~1.2 s
        await emit("delta", text=f"w{i} ", round=0)
        await asyncio.sleep(0.02)
    await emit("final", text="", rounds=0, ok=True)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    elapsed = time.monotonic() - started
    body = rig.fake.thread(CHANNEL, event["ts"])[1]
    assert body["text"].split() == [f"w{i}" for i in range(60)]
    edits = rig.fake.calls_to("chat.update")
    body_edits = [e for e in edits if e["ts"] == body["ts"]]
    assert len(body_edits) <= elapsed / 0.5 + 2, (len(body_edits), elapsed)
    times = [c.at for c in rig.fake.calls if c.method == "chat.update" and c.args["ts"] == body["ts"]]
    # Apart from the final flush, consecutive edits keep the interval.
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
    assert all(g >= 0.45 for g in gaps), gaps


async def test_long_reply_is_split_without_breaking_code_fences(make_rig):
    rig = await make_rig(edit_interval=0.05)
    event, _job, emit = await start_job(rig)
    code = "\n".join(f"value_{i} = {i} * 2  # a fairly long line of generated code" for i in range(200))
    reply = "Here is a lot of code:\n```python\n" + code + "\n```\nThat is all."
    await emit("delta", text=reply, round=0)
    await emit("final", text=reply, rounds=0, ok=True)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    body = [m["text"] for m in rig.fake.thread(CHANNEL, event["ts"])[1:]]
    assert len(body) >= 3
    for text in body:
        assert len(text) <= 3900 and fences_balanced(text)
    assert all(t.startswith("```\n") for t in body[1:])
    joined = "".join(body)
    assert all(f"value_{i} = {i} * 2" in joined for i in range(200))


async def test_long_output_is_truncated_and_attached_in_full(make_rig):
    rig = await make_rig(edit_interval=0.05)
    event, _job, emit = await start_job(rig)
    full = "".join(f"row {i}\n" for i in range(3000))
    await emit("output", text=full[:1500] + "\n…\n" + full[-500:], truncated=True, full_text=full,
               error=None, timed_out=False, duration_s=0.2)
    await emit("final", text="Done.", rounds=0, ok=True)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    [upload] = rig.fake.uploads.values()
    assert upload.filename == "output.txt" and upload.data.decode() == full
    assert upload.thread_ts == event["ts"]
    body = rig.fake.thread(CHANNEL, event["ts"])[1]["text"]
    assert "truncated; full output attached" in body and len(body) < 3900


async def test_error_event_and_cancelled_final_set_status_and_reaction(make_rig):
    rig = await make_rig(edit_interval=0.05)
    event, _job, emit = await start_job(rig)
    await emit("error", kind="model_overloaded", message="The model server is overloaded <now>.")
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    assert rig.fake.reactions == [(CHANNEL, event["ts"], "x")]
    status, body = rig.fake.thread(CHANNEL, event["ts"])
    assert status["text"] == ":x: The model server is overloaded &lt;now&gt;."
    assert "overloaded" in body["text"]

    event2, _job2, emit2 = await start_job(rig, "<@UBOT> loop forever")
    await emit2("delta", text="Working on a long loop", round=0)
    await emit2("final", text="", rounds=0, ok=False, cancelled=True)
    await rig.fake.wait_for(lambda: len(rig.fake.reactions) == 2)
    assert rig.fake.reactions[1] == (CHANNEL, event2["ts"], "black_square_for_stop")
    assert rig.fake.thread(CHANNEL, event2["ts"])[0]["text"] == ":black_square_for_stop: Stopped."


async def test_rate_limited_calls_are_retried_after_retry_after(make_rig):
    rig = await make_rig(edit_interval=0.05)
    rig.fake.fail_next("chat.postMessage", 429, times=2)
    event = mention()
    await rig.post_event(event_body(event))
    await rig.fake.wait_for(lambda: rig.fake.calls_to("chat.postMessage"), within=15)
    assert len(rig.fake.calls_to("chat.postMessage:failed")) == 2
    assert rig.fake.thread(CHANNEL, event["ts"])[0]["text"].endswith("Working on it…")


async def test_reset_is_confirmed_in_the_thread_without_a_status_message(make_rig):
    rig = await make_rig(edit_interval=0.05)
    first = mention("<@UBOT> reset")
    await rig.post_event(event_body(first))
    [job] = await rig.jobs()
    assert job.kind == "reset"
    final = Event(job_id=job.id, conversation=job.conversation, seq=1, type="final", meta=job.meta,
                  payload={"text": "Started fresh: the conversation and its Python session were reset.",
                           "rounds": 0, "ok": True, "reset": True})
    await JobQueue(rig.redis, rig.settings).publish(job.reply_stream, final)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    [reply] = rig.fake.thread(CHANNEL, first["ts"])
    assert reply["text"].startswith("Started fresh") and not reply["blocks"]
    assert rig.fake.reactions == [(CHANNEL, first["ts"], "white_check_mark")]


async def test_files_come_from_blobs_which_are_deleted_once_uploaded(make_rig):
    """Events name a blob key (bot/queue/blobs.py): the renderer takes it (fetch + delete) and uploads it;
    a file the worker skipped, or whose blob expired, is named with the reason instead."""
    from bot.queue.blobs import BlobStore

    rig = await make_rig(edit_interval=0.05)
    event, job, emit = await start_job(rig)
    blobs = BlobStore(rig.redis, rig.settings)
    key = blobs.key(job.id, 1)
    await blobs.put(key, PNG)
    await emit("image", name="plot.png", mime="image/png", size=len(PNG), blob=key)
    await emit("file", name="<!channel>.bin", mime="application/octet-stream", size=9, blob=blobs.key(job.id, 2))
    await emit("file", name="huge.bin", mime="application/octet-stream", size=10**9,
               skipped="this answer's files are over the 64.0 MB limit.")
    await emit("final", text="Here.", rounds=1, ok=True)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    [upload] = rig.fake.uploads.values()
    assert upload.filename == "plot.png" and upload.data == PNG
    assert not await rig.redis.exists(key)
    body = "\n".join(m["text"] for m in rig.fake.thread(CHANNEL, event["ts"])[1:])
    assert "`&lt;!channel&gt;.bin` expired before it could be shown" in body
    assert "`huge.bin` was not sent: this answer's files are over the 64.0 MB limit." in body


async def test_a_flooded_cells_output_is_attached_once_as_the_sandboxs_stdout_txt(make_rig):
    rig = await make_rig(edit_interval=0.05)
    event, _job, emit = await start_job(rig)
    full = "".join(f"row {i}\n" for i in range(30000))
    head_tail = full[:10000] + "\n... [output truncated: full output in stdout.txt] ...\n" + full[-10000:]
    await emit("output", text=head_tail, truncated=True, full_output_files=["stdout.txt"],
               error=None, timed_out=False, duration_s=0.2)
    await emit("file", name="stdout.txt", mime="text/plain", size=len(full),
               data_b64=base64.b64encode(full.encode()).decode())
    await emit("final", text="Done.", rounds=0, ok=True)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    [upload] = rig.fake.uploads.values()
    assert upload.filename == "stdout.txt" and upload.data.decode() == full
    body = rig.fake.thread(CHANNEL, event["ts"])[1]["text"]
    assert "truncated; full output attached as stdout.txt" in body and "full output in stdout.txt" in body
    assert "output.txt" not in body.replace("stdout.txt", "") and len(body) < 3900
