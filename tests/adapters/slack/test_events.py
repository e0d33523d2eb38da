"""Events API over real HTTP: signatures, acks, dedupe, and which events become which jobs."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.adapters.slack.conftest import (
    CHANNEL,
    SECRET,
    USER,
    event_body,
    mention,
    message,
    new_ts,
    press,
    wait_listed,
)


async def rig_through(make_rig, through: str):
    """A rig whose events take one way in: ``direct`` (HTTP mode's signed-event path, bolt never
    called for them: counted) or ``bolt`` (bolt's request pipeline and listeners, as in Socket Mode
    and for whatever the direct path does not take)."""
    rig = await make_rig()
    dispatch = rig.adapter.app.async_dispatch
    rig.bolt_calls = 0

    async def counted(request):
        rig.bolt_calls += 1
        return await dispatch(request)

    rig.adapter.app.async_dispatch = counted
    if through == "bolt":
        rig.adapter.direct = None
    return rig


THROUGH = pytest.mark.parametrize("through", ["direct", "bolt"])


@THROUGH
async def test_mention_is_acked_enqueued_and_answered_in_a_thread(make_rig, through):
    rig = await rig_through(make_rig, through)
    event = mention("<@UBOT> plot revenue &amp; costs")
    started = time.perf_counter()
    resp = await rig.post_event(event_body(event, "Ev1"))
    assert resp.status == 200
    assert time.perf_counter() - started < 3.0
    [job] = await rig.jobs()
    assert job.idempotency_key == "Ev1" and job.kind == "message"
    assert job.text == "plot revenue & costs"
    assert job.conversation.key == f"slack/T0001/{CHANNEL}/{event['ts']}"
    assert job.reply_stream == rig.settings.key("replies", "slack")
    assert job.meta == {"channel": CHANNEL, "thread_ts": event["ts"], "message_ts": event["ts"], "user": USER}
    status = await rig.fake.wait_for(lambda: rig.fake.calls_to("chat.postMessage"))
    assert status[0]["thread_ts"] == event["ts"]
    [button] = json.loads(status[0]["blocks"])[1]["elements"] if isinstance(status[0]["blocks"], str) \
        else status[0]["blocks"][1]["elements"]
    assert button["action_id"] == "codeloop_stop"
    value = json.loads(button["value"])  # this job's Stop, naming whose job it is
    assert (value["job"], value["user"], value["conversation"]["thread"]) == (job.id, USER, event["ts"])
    assert rig.bolt_calls == (1 if through == "bolt" else 0)


async def test_a_lone_surrogate_in_the_text_is_enqueued_as_a_replacement_character(make_rig):
    rig = await make_rig()
    # json.dumps writes the lone surrogate as the escape "\\ud800", as a chat client's JSON can.
    resp = await rig.post_event(event_body(mention("<@UBOT> plot \ud800 and\x00 more"), "EvSurrogate"))
    assert resp.status == 200
    [job] = await rig.jobs()
    assert job.idempotency_key == "EvSurrogate" and job.text == "plot \ufffd and more"


@THROUGH
async def test_retried_delivery_makes_one_job_and_one_status_message(make_rig, through):
    rig = await rig_through(make_rig, through)
    body = event_body(mention(), "EvRetry")
    assert (await rig.post_event(body)).status == 200
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    assert (await rig.post_event(body, headers=retry)).status == 200
    assert (await rig.post_event(body, headers={**retry, "X-Slack-Retry-Num": "2"})).status == 200
    await rig.fake.wait_for(lambda: rig.fake.calls_to("chat.postMessage"))
    await asyncio.sleep(0.2)
    assert len(await rig.jobs()) == 1
    assert len(rig.fake.calls_to("chat.postMessage")) == 1
    assert rig.bolt_calls == (3 if through == "bolt" else 0)


@pytest.mark.parametrize(
    ("secret", "age_s"), [("wrong-secret", 0), (SECRET, 6 * 60)], ids=["bad-signature", "stale-timestamp"]
)
async def test_bad_or_stale_signature_gets_401_and_no_job(make_rig, secret, age_s):
    rig = await make_rig()
    resp = await rig.post_event(event_body(mention()), secret=secret, timestamp=int(time.time()) - age_s)
    assert resp.status == 401
    assert await rig.jobs() == []


async def test_unsigned_request_gets_401(make_rig):
    rig = await make_rig()
    async with rig.http.post(rig.url + "/slack/events", json=event_body(mention())) as resp:
        assert resp.status == 401
    assert await rig.jobs() == []


async def test_url_verification_challenge(make_rig):
    rig = await make_rig()
    resp = await rig.post_event({"type": "url_verification", "challenge": "abc123", "token": "t"})
    assert resp.status == 200
    async with rig.http.get(rig.url + "/healthz") as health:
        assert health.status == 200


@pytest.mark.parametrize(
    "event",
    [
        {"type": "message", "subtype": "message_changed", "channel": CHANNEL, "ts": "1.1", "channel_type": "im",
         "message": {"user": USER, "text": "edited"}},
        {"type": "message", "subtype": "message_deleted", "channel": "D1", "ts": "1.2", "channel_type": "im"},
        {"type": "message", "user": "UBOT", "bot_id": "BBOT", "text": "my own reply", "channel": "D1",
         "ts": "1.3", "channel_type": "im"},
        {"type": "message", "subtype": "bot_message", "bot_id": "B2", "text": "other bot", "channel": "D1",
         "ts": "1.4", "channel_type": "im"},
    ],
    ids=["edit", "delete", "own-message", "other-bot"],
)
async def test_edits_deletions_and_bot_messages_are_ignored(make_rig, event):
    rig = await make_rig()
    assert (await rig.post_event(event_body(event))).status == 200
    await asyncio.sleep(0.1)
    assert await rig.jobs() == []
    assert rig.fake.calls_to("chat.postMessage") == []


@THROUGH
async def test_follow_up_in_a_joined_thread_needs_no_mention(make_rig, through):
    rig = await rig_through(make_rig, through)
    first = mention()
    await rig.post_event(event_body(first))
    await rig.post_event(event_body(message("and now times two", thread_ts=first["ts"])))
    # A mention inside the thread arrives twice (app_mention + message): one job only.
    again = new_ts()
    await rig.post_event(event_body(mention("<@UBOT> again", ts=again, thread_ts=first["ts"])))
    await rig.post_event(event_body(message("<@UBOT> again", ts=again, thread_ts=first["ts"])))
    # A thread the bot never joined, and a top-level channel message, are not for us.
    await rig.post_event(event_body(message("unrelated", thread_ts="999.000001")))
    await rig.post_event(event_body(message("hello channel")))
    jobs = await rig.jobs()
    assert [j.text for j in jobs] == ["print 1+1", "and now times two", "again"]
    assert {j.conversation.thread for j in jobs} == {first["ts"]}
    assert [j.meta["thread_ts"] for j in jobs] == [first["ts"]] * 3


async def test_direct_messages_continue_one_conversation_at_top_level(make_rig):
    rig = await make_rig()
    for text in ("x = 41", "print(x + 1)"):
        await rig.post_event(event_body(message(text, channel="D0DM", channel_type="im")))
    threaded = message("in a thread", channel="D0DM", channel_type="im", thread_ts="5.000001")
    await rig.post_event(event_body(threaded))
    jobs = await rig.jobs()
    assert [j.conversation.thread for j in jobs] == ["dm", "dm", "5.000001"]
    assert [j.meta["thread_ts"] for j in jobs] == [None, None, "5.000001"]
    posts = await rig.fake.wait_for(lambda: len(rig.fake.calls_to("chat.postMessage")) == 3
                                    and rig.fake.calls_to("chat.postMessage"))
    assert sorted(str(p.get("thread_ts")) for p in posts) == ["5.000001", "None", "None"]


async def test_allowlists(make_rig):
    rig = await make_rig(slack_allowed_channels="C0001", slack_allowed_users="U0USER", slack_allow_dms="true")
    await rig.post_event(event_body(mention(channel="C0OTHER")))
    await rig.post_event(event_body(mention(user="U0STRANGER")))
    await rig.post_event(event_body(message("dm from a stranger", user="U0STRANGER", channel="D9",
                                            channel_type="im")))
    await rig.post_event(event_body(message("dm from a friend", channel="D9", channel_type="im")))
    await rig.post_event(event_body(mention()))
    jobs = await rig.jobs()
    assert [j.text for j in jobs] == ["dm from a friend", "print 1+1"]
    refusals = await rig.fake.wait_for(lambda: len(rig.fake.calls_to("chat.postEphemeral")) == 2
                                       and rig.fake.calls_to("chat.postEphemeral"))
    assert {r["user"] for r in refusals} == {"U0STRANGER"}
    assert all("not on this bot's list" in r["text"] for r in refusals)


@pytest.mark.parametrize(("settings", "answered"), [
    ({}, True),  # no allowlist: DMs are answered
    ({"slack_allowed_channels": "C0001"}, False),  # a channel allowlist covers DMs too...
    ({"slack_allowed_channels": "C0001", "slack_allow_dms": "true"}, True),  # ...unless DMs are allowed
    ({"slack_allow_dms": "false"}, False),
], ids=["default", "allowlist", "allowlist+dms", "dms-off"])
async def test_direct_messages_follow_the_channel_allowlist_unless_allowed(make_rig, settings, answered):
    rig = await make_rig(**settings)
    dm = message("print(1)", channel="D9", channel_type="im")
    await rig.post_event(event_body(dm))
    if answered:
        assert [j.text for j in await rig.jobs()] == ["print(1)"]
        return
    [refusal] = await rig.fake.wait_for(lambda: rig.fake.calls_to("chat.postEphemeral"))
    assert refusal["user"] == USER and refusal["channel"] == "D9"
    assert refusal["text"].startswith("Direct messages to this bot are turned off")
    assert await rig.jobs() == []


async def test_empty_and_too_long_requests_get_a_clear_reply_and_no_job(make_rig):
    rig = await make_rig(max_message_chars=100)
    empty = mention("<@UBOT>   ")
    body = event_body(empty)
    await rig.post_event(body)
    await rig.post_event(body, headers={"X-Slack-Retry-Num": "1"})  # refusal not repeated on retry
    long = mention("<@UBOT> " + "x" * 101)
    await rig.post_event(event_body(long))
    posts = await rig.fake.wait_for(lambda: len(rig.fake.calls_to("chat.postEphemeral")) >= 2
                                    and rig.fake.calls_to("chat.postEphemeral"))
    await asyncio.sleep(0.2)
    assert await rig.jobs() == []
    posts = rig.fake.calls_to("chat.postEphemeral")  # refusals are for the user only
    assert len(posts) == 2 and {p["user"] for p in posts} == {USER}
    assert rig.fake.calls_to("chat.postMessage") == []
    by_thread = {p["thread_ts"]: p["text"] for p in posts}
    assert "without a request" in by_thread[empty["ts"]]
    assert "101 characters; the limit is 100" in by_thread[long["ts"]]


async def test_shared_files_become_attachments_and_oversize_ones_are_refused(make_rig):
    rig = await make_rig(max_upload_bytes=1024)
    small = rig.fake.add_file("sales.csv", b"month,revenue\n1,10\n", "text/csv")
    big = rig.fake.add_file("huge.csv", b"x" * 2048, "text/csv")
    event = mention("<@UBOT> summarise these", files=[small, big])
    await rig.post_event(event_body(event))
    [job] = await rig.jobs()
    [attachment] = job.attachments
    assert (attachment.name, attachment.size, attachment.auth) == ("sales.csv", small["size"], "slack")
    assert attachment.url == small["url_private_download"]
    [notice] = await rig.fake.wait_for(
        lambda: [p for p in rig.fake.calls_to("chat.postEphemeral") if "huge.csv" in p.get("text", "")])
    assert "2.0 KiB" in notice["text"] and notice["thread_ts"] == event["ts"] and notice["user"] == USER


async def test_reset_word_and_stop_word(make_rig, redis_client):
    rig = await make_rig()
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(rig.settings.key("cancel"))
    await pubsub.get_message(timeout=1.0)  # subscribe confirmation
    first = mention()
    await rig.post_event(event_body(first))
    [job] = await rig.jobs()
    await wait_listed(rig, job)
    await rig.post_event(event_body(mention("<@UBOT> reset", thread_ts=first["ts"])))
    await rig.post_event(event_body(mention("<@UBOT> stop", thread_ts=first["ts"])))
    jobs = await rig.jobs()
    assert [j.kind for j in jobs] == ["message", "reset"]
    # The requester's typed stop stops their job, by its id.
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
    assert msg is not None and msg["data"].decode() == f"job:{job.id}:slack/T0001/{CHANNEL}/{first['ts']}"
    assert await redis_client.exists(rig.settings.key("cancelled", job.id))
    await pubsub.aclose()


async def test_stop_button_stops_that_job(make_rig, redis_client):
    rig = await make_rig()
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(rig.settings.key("cancel"))
    await pubsub.get_message(timeout=1.0)
    first = mention()
    await rig.post_event(event_body(first))
    [job] = await rig.jobs()
    [status] = await rig.fake.wait_for(lambda: rig.fake.calls_to("chat.postMessage"))
    resp = await rig.post_interaction(press(status, USER))
    assert resp.status == 200
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
    assert msg is not None and msg["data"].decode() == f"job:{job.id}:slack/T0001/{CHANNEL}/{first['ts']}"
    await pubsub.aclose()


async def test_reset_shortcut_enqueues_a_reset_for_the_thread(make_rig):
    rig = await make_rig()
    payload = {"type": "message_action", "callback_id": "codeloop_reset", "trigger_id": "t1",
               "team": {"id": "T0001"}, "user": {"id": USER}, "channel": {"id": CHANNEL},
               "message": {"ts": "7.000002", "thread_ts": "7.000001", "text": "hi"}}
    assert (await rig.post_interaction(payload)).status == 200
    [job] = await rig.jobs()
    assert job.kind == "reset" and job.conversation.thread == "7.000001"
