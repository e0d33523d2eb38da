"""Discord input -> Jobs, over real HTTP to the fake and a real Redis."""

from __future__ import annotations

import asyncio
import json

import pytest

from bot.core.jobs import Event, Job
from bot.queue.stream import JobQueue
from tests.adapters.discord.rig import ALICE, BOB, MANAGE_MESSAGES, OTHER_BOT, next_job

pytestmark = pytest.mark.redis


def _components(message: dict) -> list[str]:
    return [c["custom_id"] for row in message.get("components", []) for c in row["components"]]


async def _finish(redis, bot, job):
    await JobQueue(redis, bot.settings).publish(job.reply_stream, Event(
        job_id=job.id, conversation=job.conversation, seq=1, type="final", payload={"text": "", "ok": True},
        meta=job.meta))


def _with_button(fake, job, custom_id):
    status = fake.messages[int(job.meta["status_message_id"])]
    return status if custom_id in _components(status) else None


async def _start(fake, gw, redis, bot, prompt="plot y = x**2", file=None):
    """/code, waited for until its job is on the stream."""
    payload = gw.slash(ALICE, prompt, file=file)
    gw.interaction(payload)
    entry, job = await next_job(redis, bot.settings)
    return payload, entry, job


async def test_code_defers_first_then_threads_and_enqueues(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot()
    csv = fake_discord.add_cdn_file(fake_discord.channel_id, "sales.csv", b"month,revenue\n1,10\n")
    payload, _, job = await _start(fake_discord, gw, redis_client, bot, "plot revenue by month", file=csv)

    first = fake_discord.calls[2]  # after the two login calls
    assert (first.method, first.path) == ("POST", f"/interactions/{payload['id']}/{payload['token']}/callback")
    assert first.json == {"type": 5} and first.query == {"with_response": "1"} and first.auth is None

    header = fake_discord.messages[fake_discord.originals[payload["token"]]]
    assert header["content"] == f"<@{ALICE}>: plot revenue by month\n📎 sales.csv"
    assert header["flags"] & 128 == 0  # no longer "thinking…"
    [thread_call] = fake_discord.find("POST", rf"/channels/{fake_discord.channel_id}/messages/{header['id']}/threads")
    assert thread_call.json["name"] == "plot revenue by month"
    assert thread_call.auth == f"Bot {fake_discord.token}"

    thread_id = header["id"]  # a thread started from a message takes its id
    [status] = fake_discord.in_channel(thread_id)
    assert status["content"] == "⏳ queued…"
    assert _components(status) == [f"codeloop:stop:{job.id}"]

    assert job.idempotency_key == payload["id"] and job.kind == "message" and job.user == str(ALICE)
    assert job.text == "plot revenue by month"
    assert job.conversation.model_dump() == {"platform": "discord", "workspace": str(fake_discord.guild_id),
                                             "channel": str(fake_discord.channel_id), "thread": thread_id}
    assert job.meta == {"thread_id": thread_id, "guild_id": str(fake_discord.guild_id), "user_id": str(ALICE),
                        "status_message_id": status["id"]}
    [att] = job.attachments
    assert (att.name, att.size, att.mime, att.url, att.auth) == ("sales.csv", 19, "text/csv", csv["url"], "discord")
    assert job.reply_stream == bot.settings.key("replies", "discord")


async def test_code_enqueues_text_cleaned_of_lone_surrogates(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot()
    payload, _, job = await _start(fake_discord, gw, redis_client, bot, "plot \udc00 y\x00 = x")
    assert job.text == "plot \ufffd y = x"
    header = fake_discord.messages[fake_discord.originals[payload["token"]]]
    assert header["content"] == f"<@{ALICE}>: plot \ufffd y = x"


async def test_code_in_a_disallowed_channel_is_refused_privately(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(discord_allowed_channels="999")
    payload = gw.slash(ALICE, "print(1)")
    gw.interaction(payload)
    call = await fake_discord.wait_for(lambda: fake_discord.find("POST", r"/interactions/.*/callback"))
    assert call[0].json["type"] == 4 and call[0].json["data"]["flags"] == 64
    assert "not enabled in this channel" in call[0].json["data"]["content"]
    await asyncio.sleep(0.2)
    assert await redis_client.xlen(bot.settings.key("jobs")) == 0
    assert not fake_discord.find("POST", r"/channels/\d+/messages/\d+/threads")


async def test_code_on_another_server_is_refused(make_bot, fake_discord, redis_client):
    _, gw = await make_bot(discord_allowed_guilds="42")
    gw.interaction(gw.slash(ALICE, "print(1)"))
    call = await fake_discord.wait_for(lambda: fake_discord.find("POST", r"/interactions/.*/callback"))
    assert "not enabled on this server" in call[0].json["data"]["content"]


async def test_per_user_concurrency_limit_and_release(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(discord_user_concurrency=1)
    _, entry, job = await _start(fake_discord, gw, redis_client, bot)

    busy = gw.slash(ALICE, "second one")
    gw.interaction(busy)
    calls = await fake_discord.wait_for(lambda: fake_discord.find("POST", rf"/interactions/{busy['id']}/.*"))
    assert calls[0].json["type"] == 4 and calls[0].json["data"]["flags"] == 64
    assert "You already have 1 run going" in calls[0].json["data"]["content"]

    other = gw.slash(BOB, "bob's own")  # the limit is per user
    gw.interaction(other)
    entry2, _ = await next_job(redis_client, bot.settings, after=entry)

    await _finish(redis_client, bot, job)  # the job's terminal event gives the slot back
    await fake_discord.wait_for(lambda: "Done" in fake_discord.in_channel(job.meta["thread_id"])[0]["content"])
    gw.interaction(gw.slash(ALICE, "third"))
    _, third = await next_job(redis_client, bot.settings, after=entry2)
    assert third.text == "third"


async def test_messages_in_the_thread_continue_it_and_others_are_ignored(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot()
    _, entry, job = await _start(fake_discord, gw, redis_client, bot)
    thread = job.conversation.thread

    gw.send_message(gw.message(OTHER_BOT, thread, "I am a bot"))
    gw.send_message(gw.message(ALICE, fake_discord.channel_id, "not in a codeloop thread"))
    follow = gw.message(BOB, thread, "now print x", attachments=[
        fake_discord.add_cdn_file(int(thread), "more.json", b"{}")])
    gw.send_message(follow)
    _, job2 = await next_job(redis_client, bot.settings, after=entry)
    assert job2.text == "now print x" and job2.user == str(BOB)
    assert job2.conversation == job.conversation and job2.idempotency_key == follow["id"]
    assert [a.name for a in job2.attachments] == ["more.json"]
    status = fake_discord.messages[int(job2.meta["status_message_id"])]
    assert status["message_reference"]["message_id"] == follow["id"] and status["type"] == 19

    gw.send_message(follow)  # the gateway may deliver an event twice
    await asyncio.sleep(0.3)
    assert await redis_client.xlen(bot.settings.key("jobs")) == 2
    assert int(job2.meta["status_message_id"]) in fake_discord.messages
    assert len([m for m in fake_discord.in_channel(thread) if "queued" in m["content"]]) == 2  # duplicate's deleted


async def test_oversize_upload_in_thread_is_refused_with_the_reason(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(max_upload_bytes=1024)
    _, _, job = await _start(fake_discord, gw, redis_client, bot)
    thread = job.conversation.thread
    big = fake_discord.add_cdn_file(int(thread), "big.csv", b"x" * 5000)
    gw.send_message(gw.message(ALICE, thread, "", attachments=[big]))
    reply = await fake_discord.wait_for(
        lambda: [m for m in fake_discord.in_channel(thread) if "big.csv" in m["content"]])
    assert "4.9 KiB" in reply[0]["content"] and "1.0 KiB" in reply[0]["content"]
    assert await redis_client.xlen(bot.settings.key("jobs")) == 1


async def _listed(bot, job):
    """Until the adapter lists ``job`` as running in its thread (typed ``stop`` looks there)."""
    for _ in range(200):
        if job.id in await bot.controls.ownership.active(job.conversation):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("job never listed")


async def _stopped(redis, bot, job) -> bool:
    return bool(await redis.exists(bot.settings.key("cancelled", job.id)))


def _answer(fake, interaction):
    """The bot's response to an interaction: (content, ephemeral?)."""
    [call] = fake.find("POST", rf"/interactions/{interaction['id']}/.*")
    data = call.json.get("data") or {}
    return data.get("content"), bool(data.get("flags", 0) & 64)


async def test_stop_button_stops_that_job_for_the_requester_or_a_moderator_only(make_bot, fake_discord,
                                                                                  redis_client):
    bot, gw = await make_bot()
    _, _, job = await _start(fake_discord, gw, redis_client, bot)
    status = fake_discord.messages[int(job.meta["status_message_id"])]
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(bot.settings.key("cancel"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    intruder = gw.button(BOB, status, f"codeloop:stop:{job.id}")
    gw.interaction(intruder)
    await fake_discord.wait_for(lambda: fake_discord.find("POST", rf"/interactions/{intruder['id']}/.*"))
    assert _answer(fake_discord, intruder) == (f"Only <@{ALICE}> or a moderator can stop this run.", True)
    assert not await _stopped(redis_client, bot, job)  # answered instead of stopping, never before it

    press = gw.button(ALICE, status, f"codeloop:stop:{job.id}")
    gw.interaction(press)
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message is not None and message["data"].decode() == f"job:{job.id}:{job.conversation.key}"
    assert await _stopped(redis_client, bot, job)

    await redis_client.delete(bot.settings.key("cancelled", job.id))
    moderator = gw.button(BOB, status, f"codeloop:stop:{job.id}", permissions=MANAGE_MESSAGES)
    gw.interaction(moderator)
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message is not None and await _stopped(redis_client, bot, job)
    await pubsub.aclose()


async def test_buttons_obey_the_channel_allowlist(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot()
    _, _, job = await _start(fake_discord, gw, redis_client, bot)
    status = fake_discord.messages[int(job.meta["status_message_id"])]
    _, gw2 = await make_bot(discord_allowed_channels="999")  # the channel was taken off the list
    press = gw2.button(ALICE, status, f"codeloop:stop:{job.id}")
    gw2.interaction(press)
    await fake_discord.wait_for(lambda: fake_discord.find("POST", rf"/interactions/{press['id']}/.*"))
    content, ephemeral = _answer(fake_discord, press)
    assert "not enabled in this channel" in content and ephemeral
    assert not await _stopped(redis_client, bot, job)


async def test_rerun_is_the_requesters_and_a_moderators_never_refetches_the_files(make_bot, fake_discord,
                                                                                  redis_client):
    bot, gw = await make_bot()
    csv = fake_discord.add_cdn_file(fake_discord.channel_id, "private.csv", b"salary\n1\n")
    _, entry, job = await _start(fake_discord, gw, redis_client, bot, "sum the file", file=csv)
    await _finish(redis_client, bot, job)
    status = await fake_discord.wait_for(lambda: _with_button(fake_discord, job, f"codeloop:rerun:{job.id}"))

    intruder = gw.button(BOB, status, f"codeloop:rerun:{job.id}")
    gw.interaction(intruder)
    await fake_discord.wait_for(lambda: fake_discord.find("POST", rf"/interactions/{intruder['id']}/.*"))
    assert _answer(fake_discord, intruder) == (f"Only <@{ALICE}> or a moderator can re-run this run.", True)

    own = gw.button(ALICE, status, f"codeloop:rerun:{job.id}")
    gw.interaction(own)
    entry, again = await next_job(redis_client, bot.settings, after=entry)
    [ack] = fake_discord.find("POST", rf"/interactions/{own['id']}/.*")
    assert ack.json == {"type": 6}  # deferred update: the message keeps its content
    assert again.text == "sum the file" and again.user == str(ALICE) and again.id != job.id
    assert [a.url for a in again.attachments] == [csv["url"]]  # the requester's own files, fetched again
    assert again.conversation == job.conversation and again.idempotency_key == own["id"]
    new_status = fake_discord.messages[int(again.meta["status_message_id"])]
    assert _components(new_status) == [f"codeloop:stop:{again.id}"]

    moderator = gw.button(BOB, status, f"codeloop:rerun:{job.id}", permissions=MANAGE_MESSAGES)
    gw.interaction(moderator)
    _, theirs = await next_job(redis_client, bot.settings, after=entry)
    assert theirs.text == "sum the file" and theirs.user == str(BOB) and theirs.attachments == []
    note = await fake_discord.wait_for(lambda: [c for c in fake_discord.find("POST", r"/webhooks/.*")
                                                if "text only" in (c.json or {}).get("content", "")])
    assert note[0].json["flags"] == 64

    expired = "codeloop:rerun:" + "0" * 32  # a button whose job record has expired
    old = {**status, "components": [{"type": 1, "components": [
        {"type": 2, "style": 2, "label": "Re-run", "custom_id": expired}]}]}
    gone = gw.button(BOB, old, expired)
    gw.interaction(gone)
    [call] = await fake_discord.wait_for(lambda: fake_discord.find("POST", rf"/interactions/{gone['id']}/.*"))
    assert "too old to re-run" in call.json["data"]["content"]


async def test_stop_and_reset_words_in_the_thread(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(rate_reset_per_min=1)
    _, entry, job = await _start(fake_discord, gw, redis_client, bot)
    thread = job.conversation.thread
    await _listed(bot, job)

    gw.send_message(gw.message(BOB, thread, "stop"))  # not BOB's run
    await fake_discord.wait_for(lambda: [m for m in fake_discord.in_channel(thread) if "can stop" in m["content"]])
    assert not await _stopped(redis_client, bot, job)
    gw.send_message(gw.message(BOB, thread, "reset"))  # not BOB's thread
    await fake_discord.wait_for(lambda: [m for m in fake_discord.in_channel(thread) if "can reset" in m["content"]])
    [refusal] = [m for m in fake_discord.in_channel(thread) if "can reset" in m["content"]]
    assert refusal["content"] == f"Only <@{ALICE}>, who started this conversation, or a moderator can reset it."

    gw.send_message(gw.message(ALICE, thread, "reset"))
    entry, reset = await next_job(redis_client, bot.settings, after=entry)
    assert reset.kind == "reset" and reset.user == str(ALICE)
    gw.send_message(gw.message(ALICE, thread, "reset"))  # over one a minute
    await fake_discord.wait_for(lambda: [m for m in fake_discord.in_channel(thread)
                                         if "resetting sessions faster" in m["content"]])

    pubsub = redis_client.pubsub()
    await pubsub.subscribe(bot.settings.key("cancel"))
    await pubsub.get_message(timeout=1)
    gw.send_message(gw.message(ALICE, thread, "stop"))
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message is not None and message["data"].decode() == f"job:{job.id}:{job.conversation.key}"
    await pubsub.aclose()
    assert await redis_client.xlen(bot.settings.key("jobs")) == 2  # the message and one reset


def test_job_records_round_trip_as_json():
    # The job record the buttons read back is the Job's own JSON.
    job = Job(idempotency_key="1", conversation={"platform": "discord", "channel": "2", "thread": "3"},
              user="4", reply_stream="r", meta={"thread_id": "3"})
    assert Job.loads(json.dumps(json.loads(job.dumps()))).meta == {"thread_id": "3"}


async def test_code_first_used_in_an_existing_thread_brings_its_newest_messages(make_bot, fake_discord,
                                                                                 redis_client):
    bot, gw = await make_bot(thread_context_messages=3, thread_context_chars=2000)
    thread_id = fake_discord.snowflake()
    said = [(ALICE, "oldest, left out", []), (BOB, "EU revenue dropped 12%", []),
            (ALICE, "here are the numbers", [fake_discord.add_cdn_file(thread_id, "eu_q3.csv", b"a,b\n")]),
            (BOB, "is it seasonal?", [])]
    for user, text, files in said:
        msg = gw.message(user, thread_id, text, attachments=files)
        fake_discord.messages[int(msg["id"])] = msg
    gw.interaction(gw.slash(ALICE, "why did EU drop?", channel=gw.thread_channel(thread_id)))
    entry, job = await next_job(redis_client, bot.settings)
    names = {u: gw.member(u)["user"]["global_name"] for u in (ALICE, BOB)}
    assert job.text == "why did EU drop?" and job.conversation.thread == str(thread_id)
    assert job.context.split("\n") == [f"{names[BOB]}: EU revenue dropped 12%",
                                       f"{names[ALICE]}: here are the numbers", "[shared files: eu_q3.csv]",
                                       f"{names[BOB]}: is it seasonal?"]
    # the thread is ours now: /code there again continues it without re-reading
    await _finish(redis_client, bot, job)
    gw.interaction(gw.slash(ALICE, "and the US?", channel=gw.thread_channel(thread_id)))
    _, second = await next_job(redis_client, bot.settings, after=entry)
    assert second.text == "and the US?" and second.context == ""
    assert len(fake_discord.find("GET", rf"/channels/{thread_id}/messages")) == 1
