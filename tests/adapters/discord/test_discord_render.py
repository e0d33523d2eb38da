"""Events on the reply stream -> messages in the thread, over real HTTP to the fake Discord."""

from __future__ import annotations

import base64
import itertools

import pytest

from bot.adapters.common import FENCE
from bot.core.jobs import Event
from bot.queue.stream import JobQueue
from tests.adapters.discord.rig import ALICE, next_job

pytestmark = pytest.mark.redis

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class Job:
    """A /code job already started, and a way to publish its events as a worker would."""

    def __init__(self, fake, redis, bot, job):
        self.fake, self.bot, self.job = fake, bot, job
        self.queue = JobQueue(redis, bot.settings)
        self.seq = itertools.count(1)
        self.thread = job.conversation.thread

    async def emit(self, type_, **payload):
        await self.queue.publish(self.job.reply_stream, Event(
            job_id=self.job.id, conversation=self.job.conversation, seq=next(self.seq), type=type_,
            payload=payload, meta=self.job.meta))

    def status(self):
        return self.fake.messages[int(self.job.meta["status_message_id"])]

    def replies(self):
        """The thread's messages after the status message."""
        return [m for m in self.fake.in_channel(self.thread) if int(m["id"]) > int(self.job.meta["status_message_id"])]

    async def finished(self):
        return await self.fake.wait_for(lambda: "queued" not in self.status()["content"]
                                        and "rerun" in str(self.status()["components"]))


@pytest.fixture
async def started(make_bot, fake_discord, redis_client):
    last = ["0"]

    async def start(**overrides):
        bot, gw = await make_bot(**overrides)
        gw.interaction(gw.slash(ALICE, "do it"))
        last[0], job = await next_job(redis_client, bot.settings, after=last[0])
        return Job(fake_discord, redis_client, bot, job)

    return start


def _balanced(text):
    return sum(line.count(FENCE) for line in text.splitlines()) % 2 == 0


async def test_streamed_text_is_edited_in_place_about_once_per_interval(started, fake_discord):
    run = await started(edit_interval_s=0.3)
    words = [f"word{i} " for i in range(30)]
    for w in words:
        await run.emit("delta", text=w, round=0)
    await run.emit("final", text="".join(words).strip(), rounds=1, ok=True)
    await run.finished()
    [answer] = run.replies()
    assert answer["content"] == "".join(words)
    mid = int(answer["id"])
    edits = fake_discord.find("PATCH", rf"/channels/{run.thread}/messages/{mid}")
    assert len(edits) < 10  # 30 deltas coalesced by the edit interval
    assert "✅ Done · 1 round" == run.status()["content"]
    assert [c["custom_id"] for row in run.status()["components"] for c in row["components"]] == [
        f"codeloop:rerun:{run.job.id}", f"codeloop:export:{run.job.id}"]


async def test_an_open_code_fence_is_closed_while_streaming(started, fake_discord):
    run = await started(edit_interval_s=0.0)
    await run.emit("delta", text="Here:\n```python\nx = 1\n", round=0)
    shown = await fake_discord.wait_for(lambda: run.replies())
    assert shown[0]["content"] == "Here:\n```python\nx = 1\n```"


async def test_a_masked_link_in_the_models_text_is_shown_with_its_url(started, fake_discord):
    run = await started(edit_interval_s=0.0)
    await run.emit("delta", text="Log in [at your bank](https://evil.example/phish) to continue.", round=0)
    await run.emit("final", text="", rounds=1, ok=True)
    await run.finished()
    [answer] = run.replies()
    assert answer["content"] == "Log in [at your bank] (https://evil.example/phish) to continue."


async def test_a_5000_character_reply_is_split_without_breaking_fences(started, fake_discord):
    run = await started()
    code = "\n".join(f"row_{i:03d} = {i} * 2  # compute the value of row {i}" for i in range(110))
    text = "Let me build it.\n```python\n" + code + "\n```\nThat is all."
    assert 4500 < len(text) < 6000
    for i in range(0, len(text), 250):
        await run.emit("delta", text=text[i:i + 250], round=0)
    await run.emit("final", text=text, rounds=1, ok=True)
    await run.finished()
    chunks = [m["content"] for m in run.replies()]
    assert len(chunks) == 3 and all(len(c) <= 2000 for c in chunks)
    assert all(_balanced(c) for c in chunks)
    assert chunks[1].startswith("```python\n") and chunks[0].endswith("```")
    rejoined = "".join(c.removesuffix("```").removeprefix("```python\n") for c in chunks)
    assert rejoined.replace("\n\n", "\n") .count("row_") == 110
    assert chunks[-1].endswith("That is all.")


async def test_code_output_and_images_in_order(started, fake_discord):
    run = await started()
    await run.emit("delta", text="Plotting.\n```python\nplt.plot([1, 2])\nprint('ok')\n```", round=0)
    await run.emit("code", code="plt.plot([1, 2])\nprint('ok')", language="python", round=0)
    await run.emit("output", text="ok", truncated=False, error=None, timed_out=False, duration_s=0.5)
    for i in range(12):
        await run.emit("image", name=f"figure-{i + 1}.png", mime="image/png", data_b64=base64.b64encode(PNG).decode())
    await run.emit("delta", text="Done, see the plots.", round=1)
    await run.emit("final", text="Done, see the plots.", rounds=2, ok=True)
    await run.finished()
    replies = run.replies()
    assert replies[0]["content"].startswith("Plotting.\n```python") and replies[0]["content"].count(FENCE) == 2
    assert replies[1]["content"] == "**Output** · 0.50 s\n```\nok\n```"
    assert [len(m["attachments"]) for m in replies[2:4]] == [10, 2]  # at most 10 per message
    names = [a["filename"] for m in replies[2:4] for a in m["attachments"]]
    assert names == [f"figure-{i}.png" for i in range(1, 13)]
    assert fake_discord.files[replies[2]["attachments"][0]["url"].split("/attachments/")[1]] == PNG
    assert replies[4]["content"] == "Done, see the plots."
    assert run.status()["content"] == "✅ Done · 2 rounds"


async def test_long_output_is_attached_in_full_with_a_preview(started, fake_discord):
    run = await started()
    lines = "\n".join(f"line {i:04d} " + "x" * 40 for i in range(100))
    assert len(lines) > 5000
    await run.emit("output", text=lines, truncated=False, error={"name": "ValueError", "value": "bad"},
                   timed_out=False, duration_s=1.25)
    await run.emit("final", text="", rounds=1, ok=False)
    await run.finished()
    [out] = run.replies()
    assert out["content"].startswith(f"**Output** · `ValueError` · 1.25 s · {len(lines):,} characters, attached")
    assert len(out["content"]) <= 2000 and "line 0000" in out["content"] and "line 0099" in out["content"]
    [att] = out["attachments"]
    assert att["filename"] == "output.txt"
    assert fake_discord.files[att["url"].split("/attachments/")[1]].decode() == lines
    assert run.status()["content"].startswith("⚠️ Finished, but the last run failed")


async def test_files_over_the_upload_limit_become_a_note(started, fake_discord):
    run = await started()
    run.bot.renderer.file_limit = 1024
    big = base64.b64encode(b"y" * 4096).decode()
    await run.emit("file", name="big.parquet", mime="application/octet-stream", size=4096, data_b64=big)
    await run.emit("file", name="small.csv", mime="text/csv", size=3, data_b64=base64.b64encode(b"a,b").decode())
    await run.emit("final", text="", rounds=1, ok=True)
    await run.finished()
    attached, note = run.replies()
    assert [a["filename"] for a in attached["attachments"]] == ["small.csv"]
    assert "`big.parquet` is 4.0 KiB, over Discord's 1.0 KiB upload limit" in note["content"]


async def test_status_cancel_and_error_lines(started, fake_discord):
    run = await started()
    await run.emit("status", text="running code")
    await fake_discord.wait_for(lambda: run.status()["content"] == "⏳ running code…")
    assert "stop" in str(run.status()["components"])  # a status edit keeps the Stop button
    await run.emit("final", text="", rounds=1, ok=False, cancelled=True)
    await fake_discord.wait_for(lambda: run.status()["content"] == "⏹ Stopped.")

    other = await started()
    await other.emit("error", kind="model_overloaded", message="The model server is overloaded.")
    await fake_discord.wait_for(lambda: other.status()["content"] == "⚠️ The model server is overloaded.")


async def test_rate_limited_edit_is_retried_by_discordpy(started, fake_discord):
    run = await started(edit_interval_s=0.0)
    await run.emit("delta", text="first", round=0)
    await fake_discord.wait_for(lambda: run.replies())
    fake_discord.fail_next("PATCH", rf"/channels/{run.thread}/messages/\d+", 429)
    await run.emit("delta", text=" second", round=0)
    await run.emit("final", text="first second", rounds=1, ok=True)
    await run.finished()
    [answer] = run.replies()
    assert answer["content"] == "first second"
    edits = fake_discord.find("PATCH", rf"/channels/{run.thread}/messages/{answer['id']}")
    assert [e.json["content"] for e in edits] == ["first second", "first second"]  # 429, then the retry


async def test_an_event_delivered_twice_is_rendered_once(started, fake_discord, redis_client):
    run = await started()
    event = Event(job_id=run.job.id, conversation=run.job.conversation, seq=1, type="output",
                  payload={"text": "once", "error": None, "duration_s": 0.1}, meta=run.job.meta)
    await run.queue.publish(run.job.reply_stream, event)
    await run.queue.publish(run.job.reply_stream, event)
    await run.emit("final", text="", rounds=1, ok=True)  # seq 1 again as well: ignored
    await run.queue.publish(run.job.reply_stream, Event(**{**event.model_dump(), "seq": 2, "type": "final",
                                                           "payload": {"ok": True, "rounds": 1}}))
    await run.finished()
    assert [m["content"] for m in run.replies()] == ["**Output** · 0.10 s\n```\nonce\n```"]


async def test_files_come_from_blobs_which_are_deleted_once_taken(started, fake_discord, redis_client):
    from bot.queue.blobs import BlobStore

    run = await started()
    blobs = BlobStore(redis_client, run.bot.settings)
    key = blobs.key(run.job.id, 1)
    await blobs.put(key, PNG)
    await run.emit("image", name="figure-1.png", mime="image/png", size=len(PNG), blob=key)
    await run.emit("file", name="gone.csv", mime="text/csv", size=3, blob=blobs.key(run.job.id, 2))
    await run.emit("file", name="huge.bin", mime="application/octet-stream", size=10**9,
                   skipped="this answer's files are over the 64.0 MB limit.")
    await run.emit("final", text="", rounds=1, ok=True)
    await run.finished()
    attached, note = run.replies()
    assert [a["filename"] for a in attached["attachments"]] == ["figure-1.png"]
    assert fake_discord.files[attached["attachments"][0]["url"].split("/attachments/")[1]] == PNG
    assert not await redis_client.exists(key)
    assert "`gone.csv` expired before it could be shown" in note["content"]
    assert "`huge.bin` was not sent: this answer's files are over the 64.0 MB limit." in note["content"]
