"""Bad input through a real worker: each case ends with a message the user can act on, the worker
keeps going, and the conversation stays usable. (Plain poison entries without a place in a
thread are covered in tests/worker/test_service.py.)"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import REGISTRY

from bot.core.jobs import Attachment, Conversation, Event, Job
from bot.queue.stream import _ENQUEUE, JobQueue
from tests.faults.test_limits import UNLIMITED, terminals


def job(thread: str, reply: str, text: str = "hi", attachments: list[Attachment] | None = None) -> Job:
    return Job(idempotency_key=f"{thread}-{len(text)}-{text[:20]}", user="u", text=text, reply_stream=reply,
               attachments=attachments or [], conversation=Conversation(platform="test", channel="c", thread=thread))


async def enqueue_raw(queue: JobQueue, template: Job, raw: str) -> None:
    """Enqueue JSON no current worker can parse, the way ``enqueue`` does (idempotency key, a seq
    in its thread): a newer adapter during a rolling upgrade, or a producer not written in Python."""
    keys, args = queue._enqueue_call(template, queue.settings.key("idem", "test", template.idempotency_key))
    args[3] = raw
    await queue.scripts.run(_ENQUEUE, keys, args)


@pytest.fixture
async def rig(text_worker: Any, model_server: Any, make_settings: Any, redis_client: aioredis.Redis) -> Any:
    model_server.script = lambda messages: f"echo: {messages[-1]['content']}"
    worker = await text_worker(make_settings(llm_url=model_server.url, max_upload_bytes=1024 * 1024, **UNLIMITED))
    return JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")


async def one_reply(queue: JobQueue, reply: str, j: Job) -> Event:
    await queue.enqueue(j)
    [(_, event)] = await terminals(queue.redis, reply, 1)
    return event


CASES = {
    "long": (dict(text="x" * 40_000), "The message is 40,000 characters; the limit is 20,000. Attach long text"),
    "empty": (dict(text="  \n "), "The message is empty: tell me what to do"),
    "oversize": (dict(attachments=[Attachment(name="big.csv", size=30 * 1024 * 1024, url="http://127.0.0.1:9/x")]),
                 "`big.csv` is 30.0 MiB; files up to 1.0 MiB are accepted."),
    "lies about its size": (
        dict(attachments=[Attachment(name="small.csv", size=10,
                                     data_b64=base64.b64encode(b"a,b\n" * 600_000).decode())]),
        "`small.csv` is 2.3 MiB; files up to 1.0 MiB are accepted."),
    "executable": (dict(attachments=[Attachment(name="run.exe", size=4, data_b64=base64.b64encode(b"MZ\x90\x00")
                                                .decode())]), "`run.exe` looks like an executable"),
    "damaged": (dict(attachments=[Attachment(name="d.csv", size=3, data_b64="@@not base64@@")]),
                "`d.csv` arrived damaged (its data is not valid base64)"),
}


@pytest.mark.parametrize("case", CASES)
async def test_bad_input_gets_a_clear_message_and_the_thread_goes_on(rig: Any, model_server: Any, case: str) -> None:
    queue, reply = rig
    fields, message = CASES[case]
    event = await one_reply(queue, reply, job("T", reply, **fields))  # type: ignore[arg-type]
    assert event.type == "error" and event.payload["kind"] == "input_rejected"
    assert event.payload["message"].startswith(message), event.payload["message"]
    assert model_server.requests == []  # nothing reached the model (or a sandbox)
    await queue.enqueue(job("T", reply, text="and now a real question"))
    done = await terminals(queue.redis, reply, 2)
    assert done[-1][1].payload["text"] == "echo: and now a real question"


async def test_invalid_utf8_bytes_on_the_stream_are_replaced_not_fatal(rig: Any, model_server: Any) -> None:
    queue, reply = rig
    template = job("U", reply, text="PLACEHOLDER")
    raw = template.dumps().encode().replace(b"PLACEHOLDER", b"caf\xc3\xa9 \xff\xfe end")
    await enqueue_raw(queue, template, raw)  # type: ignore[arg-type]
    [(_, event)] = await terminals(queue.redis, reply, 1)
    assert event.type == "final" and event.payload["text"] == "echo: café \ufffd\ufffd end"


@pytest.mark.parametrize("damage", ["schema", "kind"])
async def test_unreadable_job_with_a_place_in_its_thread_is_reported_and_does_not_block_it(
        rig: Any, model_server: Any, damage: str) -> None:
    queue, reply = rig
    before = REGISTRY.get_sample_value("codeloop_dead_letters_total", {"reason": "poison"}) or 0.0
    template = job("P", reply, text="PLACEHOLDER")
    raw = template.dumps()
    raw = raw.replace('"schema_version":1', '"schema_version":2') if damage == "schema" else \
        raw.replace('"kind":"message"', '"kind":"launch"')
    await enqueue_raw(queue, template, raw)
    await queue.enqueue(job("P", reply, text="the next question"))  # seq 2 of the same thread
    done = [e for _, e in await terminals(queue.redis, reply, 2, timeout=15)]
    assert [e.type for e in done] == ["error", "final"], "the thread is stuck behind the unreadable job"
    assert done[0].job_id == template.id and done[0].payload["kind"] == "poison"
    assert done[0].payload["message"].startswith("This request could not be read (malformed job")
    assert done[0].payload["message"].endswith("so it was not run. Please send it again.")
    assert done[1].payload["text"] == "echo: the next question"
    [(_, dead)] = await queue.redis.xrange(queue.dead_stream)
    assert dead[b"reason"].startswith(b"malformed job") and dead[b"seq"] == b"1"
    assert REGISTRY.get_sample_value("codeloop_dead_letters_total", {"reason": "poison"}) == before + 1


async def test_a_lone_surrogate_in_a_job_is_replaced_not_fatal(rig: Any, model_server: Any) -> None:
    """A producer's JSON may carry half a surrogate pair (``\\ud83d``) in any string; the job runs
    with U+FFFD in its place (in the text, and in an attachment name a refusal quotes) instead of
    being dead-lettered or failing with an internal error."""
    queue, reply = rig
    template = job("S", reply, text="PLACEHOLDER")
    await enqueue_raw(queue, template, template.dumps().replace("PLACEHOLDER", "half an emoji \\ud83d\\u0000!"))
    [(_, event)] = await terminals(queue.redis, reply, 1)
    assert event.type == "final" and event.payload["text"] == "echo: half an emoji \ufffd!"

    named = job("S", reply, text="read it", attachments=[Attachment(name="NAME", size=4, data_b64="TVqQAA==")])
    await enqueue_raw(queue, named, named.dumps().replace('"NAME"', '"run\\udc00me.exe"'))
    done = await terminals(queue.redis, reply, 2)
    error = done[-1][1]
    assert error.type == "error" and error.payload["kind"] == "input_rejected"
    assert error.payload["message"].startswith("`run\ufffdme.exe` looks like an executable")


def test_events_with_unencodable_text_are_written_cleaned() -> None:
    """What a cell prints or raises can hold a lone surrogate; the event carrying it is written
    with U+FFFD instead of failing to serialise (and taking the job down with it)."""
    conv = Conversation(platform="test", channel="c", thread="t")
    event = Event(job_id="j", conversation=conv, seq=1, type="error",
                  payload={"message": "bad \ud800 value\x00", "nested": [{"name": "f\udfff.txt"}]})
    again = Event.loads(event.dumps())
    assert again.payload == {"message": "bad \ufffd value", "nested": [{"name": "f\ufffd.txt"}]}
    assert Job(idempotency_key="k\ud800", conversation=conv, user="u\x00", reply_stream="r",
               meta={"who": "\udc00"}).dumps()  # built from unclean input, it still encodes


@pytest.mark.parametrize("url", ["https://attacker.example/steal", "http://files.slack.com/files-pri/T1/x.csv",
                                 "LOOPBACK"])
async def test_the_slack_token_is_only_sent_to_slack(make_settings: Any, text_worker: Any, model_server: Any,
                                                     redis_client: aioredis.Redis, url: str) -> None:
    """An attachment marked ``auth="slack"`` is fetched with the bot token; a job (from a bug, a
    compromised adapter, or a crafted payload) pointing it elsewhere must not get the token: not
    another host, not plain http, not a listening server on loopback (no exception for it)."""
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(body=b"a,b\n")

    app = web.Application()
    app.router.add_get("/{name}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        model_server.script = lambda messages: "unused"
        worker = await text_worker(make_settings(llm_url=model_server.url, slack_bot_token="xoxb-secret",
                                                 slack_api_url=f"http://127.0.0.1:{port}/api/", **UNLIMITED))
        queue, reply = JobQueue(redis_client, worker.settings), worker.settings.key("replies", "t")
        target = f"http://127.0.0.1:{port}/data.csv" if url == "LOOPBACK" else url
        fake = Attachment(name="data.csv", size=10, url=target, auth="slack")
        event = await one_reply(queue, reply, job("X", reply, attachments=[fake]))
    finally:
        await runner.cleanup()
    assert event.type == "error"
    assert event.payload["message"] == "`data.csv` does not come from Slack's file servers; it was not fetched."
    assert seen == [] and model_server.requests == []
