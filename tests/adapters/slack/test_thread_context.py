"""A first mention inside an existing Slack thread brings the thread's earlier messages to the
model: read through the real adapter from the fake Web API's conversations.replies."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bot.agent.prompts import THREAD_CONTEXT_INTRO
from tests.adapters.slack.conftest import CHANNEL, event_body, mention

ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"


def seed_thread(fake: Any) -> str:
    """A discussion the bot was not part of: 5 messages, files on one, a mention of Carol."""
    parent = fake.add_message(CHANNEL, ALICE, "Oldest: the Q3 report is out", user_profile={"display_name": "alice"})
    ts = parent["ts"]
    fake.add_message(CHANNEL, BOB, "second message, about nothing", thread_ts=ts)
    fake.add_message(CHANNEL, ALICE, "EU revenue dropped 12% &amp; US is flat <@U0CAROL>", thread_ts=ts,
                     user_profile={"display_name": "alice"})
    fake.set_user(BOB, real_name="Bob Stone", profile={"display_name": "bob"})
    fake.set_user(CAROL, real_name="Carol Diaz", profile={"display_name": ""})
    fake.add_message(CHANNEL, BOB, "Here are the numbers", thread_ts=ts,
                     files=[{"id": "F1", "name": "eu_q3.csv"}, {"id": "F2", "name": "us_q3.csv"}])
    fake.add_message(CHANNEL, CAROL, "Is it seasonal? <https://example.org/q3|last year>", thread_ts=ts)
    return str(ts)


def later_mention(text: str, thread_ts: str) -> dict[str, Any]:
    # after every seeded message: Slack's ts orders a thread
    return mention(text, thread_ts=thread_ts, ts=f"{int(time.time()) + 2}.{time.monotonic_ns() % 10**6:06d}")


async def test_first_mention_in_a_thread_carries_its_newest_messages_named_and_bounded(make_rig):
    rig = await make_rig(thread_context_messages=3, thread_context_chars=2000)
    thread = seed_thread(rig.fake)
    await rig.post_event(event_body(later_mention("<@UBOT> why did EU drop?", thread)))
    [job] = await rig.jobs()
    assert job.text == "why did EU drop?"
    lines = job.context.split("\n")
    assert lines == [
        "(2 earlier messages left out)",
        "alice: EU revenue dropped 12% & US is flat @Carol Diaz",
        "bob: Here are the numbers",
        "[shared files: eu_q3.csv, us_q3.csv]",
        "Carol Diaz: Is it seasonal? last year (https://example.org/q3)",
    ]
    assert [c["ts"] for c in rig.fake.calls_to("conversations.replies")] == [thread]

    # the thread is joined now: a later mention continues the conversation, without re-reading
    await rig.fake.wait_for(lambda: rig.fake.thread(CHANNEL, thread))
    await rig.post_event(event_body(later_mention("<@UBOT> and the US?", thread)))
    jobs = await rig.jobs()
    assert len(jobs) == 2 and jobs[1].context == ""
    assert len(rig.fake.calls_to("conversations.replies")) == 1


async def test_the_character_budget_keeps_the_newest_messages(make_rig):
    rig = await make_rig(thread_context_messages=30, thread_context_chars=120)
    thread = seed_thread(rig.fake)
    await rig.post_event(event_body(later_mention("<@UBOT> summarise", thread)))
    [job] = await rig.jobs()
    assert len(job.context) <= 120 + 40
    assert job.context.endswith("Carol Diaz: Is it seasonal? last year (https://example.org/q3)")
    assert "Oldest" not in job.context and "earlier messages left out" in job.context


async def test_a_top_level_mention_or_an_unreadable_thread_brings_no_context(make_rig):
    rig = await make_rig()
    await rig.post_event(event_body(mention("<@UBOT> print 1")))
    thread = seed_thread(rig.fake)
    rig.fake.fail_next("conversations.replies", 500, times=5)
    await rig.post_event(event_body(later_mention("<@UBOT> print 2", thread)))
    jobs = await rig.jobs()
    assert [j.text for j in jobs] == ["print 1", "print 2"]  # the request still runs
    assert [j.context for j in jobs] == ["", ""]


@pytest.mark.docker
@pytest.mark.slow
async def test_the_threads_context_reaches_the_model_for_that_first_turn(make_rig, start_worker, model_server):
    model_server.script = ["EU dropped because of the currency.", "The US is flat."]
    rig = await make_rig(edit_interval=0.2)
    await start_worker(slack_bot_token=rig.fake.token)
    thread = seed_thread(rig.fake)
    first = later_mention("<@UBOT> why did EU drop?", thread)
    await rig.post_event(event_body(first))
    await rig.fake.wait_for(lambda: [r for r in rig.fake.reactions if r[1] == first["ts"]], within=120)
    asked = model_server.requests[0]["messages"][-1]["content"]
    assert asked.startswith(THREAD_CONTEXT_INTRO)
    assert "bob: Here are the numbers\n[shared files: eu_q3.csv, us_q3.csv]" in asked
    assert "alice: Oldest: the Q3 report is out" in asked and asked.endswith("why did EU drop?")
    second = later_mention("<@UBOT> and the US?", thread)
    await rig.post_event(event_body(second))
    await rig.fake.wait_for(lambda: [r for r in rig.fake.reactions if r[1] == second["ts"]], within=120)
    messages = model_server.requests[1]["messages"]
    assert messages[-1]["content"] == "and the US?"  # later turns continue as today
    assert sum(THREAD_CONTEXT_INTRO in m["content"] for m in messages) == 1  # once, in the history
