"""Discord "@codeloop <task>" messages and replies: the message replied to (and the chain before
it) reaches the job as context. Real discord.py parsing, real HTTP to the fake, real Redis."""

from __future__ import annotations

import asyncio

import pytest

from bot.adapters.discord.context import BOT_NAME, REPLY_NOTE
from bot.agent.prompts import THREAD_CONTEXT_INTRO
from tests.adapters.discord.rig import ALICE, BOB, next_job

pytestmark = pytest.mark.redis


def _names(gw):
    return {u: gw.member(u)["user"]["global_name"] for u in (ALICE, BOB)}


async def _no_job(redis, bot, fake, replied_to):
    """Waits for the bot's reply to ``replied_to`` (the positive signal), then checks no job."""
    await fake.wait_for(lambda: [m for m in fake.messages.values()
                                 if (m.get("message_reference") or {}).get("message_id") == replied_to["id"]])
    assert await redis.xlen(bot.settings.key("jobs")) == 0
    [reply] = [m for m in fake.messages.values()
               if (m.get("message_reference") or {}).get("message_id") == replied_to["id"]]
    return reply["content"]


async def test_a_mention_in_a_channel_asks_like_code_in_a_thread_from_that_message(make_bot, fake_discord,
                                                                                   redis_client):
    bot, gw = await make_bot()
    csv = fake_discord.add_cdn_file(fake_discord.channel_id, "sales.csv", b"month,revenue\n1,10\n")
    asked = gw.message(ALICE, fake_discord.channel_id, f"{gw.mention()} plot revenue by month", attachments=[csv])
    gw.send_message(asked)
    entry, job = await next_job(redis_client, bot.settings)
    assert job.text == "plot revenue by month" and job.user == str(ALICE) and job.context == ""
    assert [a.name for a in job.attachments] == ["sales.csv"] and job.idempotency_key == asked["id"]
    [thread_call] = fake_discord.find("POST", rf"/channels/{fake_discord.channel_id}/messages/{asked['id']}/threads")
    assert thread_call.json["name"] == "plot revenue by month"
    assert job.conversation.thread == asked["id"] and job.conversation.channel == str(fake_discord.channel_id)
    [status] = fake_discord.in_channel(asked["id"])
    assert status["content"] == "⏳ queued…"

    gw.send_message(asked)  # the gateway may deliver an event twice: no second thread, no second job
    follow = gw.message(ALICE, asked["id"], "and the mean?")  # the thread is ours: follow-ups continue it
    gw.send_message(follow)
    _, job2 = await next_job(redis_client, bot.settings, after=entry)
    assert job2.idempotency_key == follow["id"] and job2.conversation == job.conversation
    assert await redis_client.xlen(bot.settings.key("jobs")) == 2
    assert len(fake_discord.find("POST", r"/channels/\d+/messages/\d+/threads")) == 1


async def test_a_mention_is_checked_like_code(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(discord_allowed_channels=[str(fake_discord.channel_id)], max_message_chars=100)
    elsewhere = gw.message(ALICE, 1300000000000000099, f"{gw.mention()} plot x")
    gw.send_message(elsewhere)  # (a channel the bot does not know is ignored: only cached ones answer)
    too_long = gw.message(ALICE, fake_discord.channel_id, f"{gw.mention()} {'x' * 150}")
    gw.send_message(too_long)
    assert "the limit is 100" in await _no_job(redis_client, bot, fake_discord, too_long)
    empty = gw.message(ALICE, fake_discord.channel_id, gw.mention())
    gw.send_message(empty)
    assert "without a request" in await _no_job(redis_client, bot, fake_discord, empty)
    stop = gw.message(ALICE, fake_discord.channel_id, f"{gw.mention()} stop")
    gw.send_message(stop)
    assert "inside the codeloop thread" in await _no_job(redis_client, bot, fake_discord, stop)
    not_me = gw.message(ALICE, fake_discord.channel_id, f"<@{BOB}> plot x")  # someone else mentioned
    gw.send_message(not_me)
    await asyncio.sleep(0.3)
    assert await redis_client.xlen(bot.settings.key("jobs")) == 0
    assert not fake_discord.find("POST", r"/channels/\d+/messages/\d+/threads")


async def test_a_mention_in_a_disallowed_thread_is_refused_in_a_reply(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(discord_allowed_channels=["1300000000000000077"])
    gw.known_thread(1400000000000000500)
    asked = gw.message(ALICE, 1400000000000000500, f"{gw.mention()} plot x")
    gw.send_message(asked)
    assert "not enabled in this channel" in await _no_job(redis_client, bot, fake_discord, asked)


async def test_a_reply_brings_the_message_and_the_chain_it_answers_newest_kept(make_bot, fake_discord,
                                                                             redis_client):
    bot, gw = await make_bot(thread_context_messages=3, thread_context_chars=2000)
    ch = fake_discord.channel_id
    oldest = gw.said(gw.message(ALICE, ch, "the Q3 report is out"))
    report = gw.said(gw.reply(BOB, ch, "EU revenue dropped 12%", oldest, attachments=[
        fake_discord.add_cdn_file(ch, "eu_q3.csv", b"a,b\n")]))
    ours = gw.said(fake_discord.message(ch, "I can chart that.", message_reference={
        "type": 0, "message_id": report["id"], "channel_id": str(ch)}, type=19))  # by the bot itself
    seasonal = gw.said(gw.reply(ALICE, ch, "is it seasonal?", ours))
    # the gateway resolves only the message replied to; older links are read by id over REST
    gw.send_message(gw.reply(BOB, ch, f"{gw.mention()} check the last four quarters", seasonal))
    _, job = await next_job(redis_client, bot.settings)
    names = _names(gw)
    assert job.text == "check the last four quarters"
    assert job.context.split("\n") == [f"{names[BOB]}: EU revenue dropped 12%", "[shared files: eu_q3.csv]",
                                       f"{BOT_NAME}: I can chart that.", f"{names[ALICE]}: is it seasonal?",
                                       REPLY_NOTE]  # 3 messages: "the Q3 report is out" left out
    fetched = [c.path for c in fake_discord.find("GET", rf"/channels/{ch}/messages/\d+")]
    assert fetched == [f"/channels/{ch}/messages/{ours['id']}"]  # its answer carried the next link


async def test_the_character_budget_keeps_the_newest_of_the_chain(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(thread_context_messages=10, thread_context_chars=len(REPLY_NOTE) + 60)
    ch = fake_discord.channel_id
    first = gw.said(gw.message(ALICE, ch, "an older message that does not fit"))
    long = gw.said(gw.reply(BOB, ch, "x" * 100 + " the end", first))
    gw.send_message(gw.reply(ALICE, ch, f"{gw.mention()} summarise", long))
    _, job = await next_job(redis_client, bot.settings)
    line, note = job.context.split("\n")
    assert note == REPLY_NOTE and line.startswith("…") and line.endswith("x the end")
    assert len(job.context) <= len(REPLY_NOTE) + 60


async def test_a_deleted_or_unreadable_reference_only_means_no_context(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot(discord_user_concurrency=3)
    ch = fake_discord.channel_id
    gone = gw.said(gw.message(BOB, ch, "deleted later"))
    del fake_discord.messages[int(gone["id"])]
    gw.send_message(gw.reply(ALICE, ch, f"{gw.mention()} one", gone))  # resolved as deleted (null)
    entry, job = await next_job(redis_client, bot.settings)
    assert job.text == "one" and job.context == ""

    gw.send_message(gw.reply(ALICE, ch, f"{gw.mention()} two", gone, resolved=False))  # fetched: 404
    entry, job = await next_job(redis_client, bot.settings, after=entry)
    assert job.text == "two" and job.context == ""

    secret = gw.said(gw.message(BOB, ch, "not readable"))
    fake_discord.fail_next("GET", rf"/channels/{ch}/messages/{secret['id']}", 403)
    gw.send_message(gw.reply(ALICE, ch, f"{gw.mention()} three", secret, resolved=False))
    _, job = await next_job(redis_client, bot.settings, after=entry)
    assert job.text == "three" and job.context == ""
    assert len(fake_discord.find("GET", rf"/channels/{ch}/messages/\d+")) == 2


async def test_a_reply_inside_our_thread_carries_the_message_it_answers(make_bot, fake_discord, redis_client):
    bot, gw = await make_bot()
    gw.interaction(gw.slash(ALICE, "plot y = x**2"))
    entry, job = await next_job(redis_client, bot.settings)
    thread = job.conversation.thread
    answer = gw.said(fake_discord.message(thread, "The squares add up to 30."))  # the bot's answer there
    gw.send_message(gw.reply(BOB, thread, "why 30?", answer))
    _, job2 = await next_job(redis_client, bot.settings, after=entry)
    assert job2.text == "why 30?" and job2.context == f"{BOT_NAME}: The squares add up to 30.\n{REPLY_NOTE}"


@pytest.mark.docker
@pytest.mark.slow
async def test_the_replied_to_messages_reach_the_model(make_bot, start_worker, model_server, fake_discord,
                                                       redis_client):
    model_server.script = ["EU dropped because of the currency."]
    await start_worker()
    bot, gw = await make_bot()
    ch = fake_discord.channel_id
    report = gw.said(gw.message(BOB, ch, "EU revenue dropped 12% in Q3"))
    ours = gw.said(fake_discord.message(ch, "Shall I chart it?", message_reference={
        "type": 0, "message_id": report["id"], "channel_id": str(ch)}, type=19))
    gw.send_message(gw.reply(ALICE, ch, f"{gw.mention()} why did it drop?", ours))
    _, job = await next_job(redis_client, bot.settings)
    status_id = int(job.meta["status_message_id"])
    await fake_discord.wait_for(lambda: "codeloop:rerun" in str(fake_discord.messages[status_id]["components"]),
                                within=120)
    asked = model_server.requests[0]["messages"][-1]["content"]
    names = _names(gw)
    assert asked.startswith(THREAD_CONTEXT_INTRO) and asked.endswith("why did it drop?")
    assert (f"{names[BOB]}: EU revenue dropped 12% in Q3\n{BOT_NAME}: Shall I chart it?\n{REPLY_NOTE}"
            in asked)
