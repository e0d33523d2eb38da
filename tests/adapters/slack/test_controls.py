"""Stop and reset on Slack belong to the requester (a reset: the thread's starter) or a moderator,
obey the allowlists, and answer anyone else ephemerally; refusals never ping or link. Through the
adapter's real HTTP endpoint, the fake Web API and real Redis. (With a real worker: test_e2e.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.adapters.slack.conftest import CHANNEL, TEAM, USER, event_body, mention, message, press, wait_listed

OTHER = "U0OTHER"
ADMIN = "U0ADMIN"


async def started(rig: Any, text: str = "<@UBOT> print 1+1", **extra: Any) -> tuple[dict[str, Any], Any, Any]:
    """USER's request: the event, its job (listed as running) and its status message."""
    before = len(await rig.jobs())
    event = mention(text, **extra)
    await rig.post_event(event_body(event))
    job = (await rig.jobs())[before]
    await wait_listed(rig, job)
    [status] = await rig.fake.wait_for(
        lambda: [c for c in rig.fake.calls_to("chat.postMessage") if c.get("thread_ts") == job.meta["thread_ts"]
                 and c.get("blocks")])
    return event, job, status


def ephemerals(rig: Any, user: str) -> list[dict[str, Any]]:
    return [c for c in rig.fake.calls_to("chat.postEphemeral") if c["user"] == user]


async def stopped(rig: Any, job: Any) -> bool:
    return bool(await rig.redis.exists(rig.settings.key("cancelled", job.id)))


async def test_another_users_stop_press_is_refused_ephemerally_and_stops_nothing(make_rig):
    rig = await make_rig()
    _, job, status = await started(rig)
    assert (await rig.post_interaction(press(status, OTHER))).status == 200
    [refusal] = await rig.fake.wait_for(lambda: ephemerals(rig, OTHER))
    assert refusal["text"] == f"Only <@{USER}> or a moderator can stop this run."
    assert refusal["channel"] == CHANNEL and refusal["thread_ts"] == job.meta["thread_ts"]
    assert not await stopped(rig, job)  # the refusal is sent instead of the stop, never after it
    assert [c["user"] for c in rig.fake.calls_to("users.info")] == [OTHER]  # asked whether OTHER is an admin


@pytest.mark.parametrize("how", ["workspace admin", "listed moderator"])
async def test_a_moderator_may_stop_anyones_run(make_rig, how):
    rig = await make_rig(slack_moderators="U0MOD" if how == "listed moderator" else "")
    rig.fake.set_user(ADMIN, is_admin=True)
    _, job, status = await started(rig)
    await rig.post_interaction(press(status, ADMIN if how == "workspace admin" else "U0MOD"))
    assert await stopped(rig, job)
    assert rig.fake.calls_to("chat.postEphemeral") == []


async def test_stop_presses_obey_the_allowlists_and_old_buttons_say_how_to_stop(make_rig):
    rig = await make_rig(slack_allowed_users=USER)
    _, job, status = await started(rig)
    rig.fake.set_user(OTHER, is_admin=True)  # an admin, but not on the bot's list
    await rig.post_interaction(press(status, OTHER))
    [refusal] = await rig.fake.wait_for(lambda: ephemerals(rig, OTHER))
    assert "not on this bot's list" in refusal["text"]
    # A button from before Stop named its job carries only the conversation.
    old = press(status, USER)
    old["actions"][0]["value"] = json.dumps(job.conversation.model_dump())
    await rig.post_interaction(old)
    [note] = await rig.fake.wait_for(lambda: ephemerals(rig, USER))
    assert "type `stop` in the thread" in note["text"]
    assert not await stopped(rig, job)

    # A channel taken off the allowlist: its old buttons stop working too.
    rig2 = await make_rig(slack_allowed_channels="C0ELSEWHERE")
    await rig2.post_interaction(press(status, USER))
    [off] = await rig2.fake.wait_for(lambda: [c for c in ephemerals(rig2, USER) if "not enabled" in c["text"]])
    assert off["channel"] == CHANNEL
    assert not await stopped(rig, job)


async def test_typed_stop_stops_only_the_typists_own_runs_unless_a_moderator(make_rig):
    rig = await make_rig()
    first, mine, _ = await started(rig)
    theirs = message("and plot it", user=OTHER, thread_ts=first["ts"])
    await rig.post_event(event_body(theirs))
    [_, other_job] = await rig.jobs()
    await wait_listed(rig, other_job)

    await rig.post_event(event_body(message("stop", user=OTHER, thread_ts=first["ts"])))
    assert await stopped(rig, other_job) and not await stopped(rig, mine)  # OTHER's own run only

    # A third user with nothing running there is told whose run it is.
    await rig.redis.delete(rig.settings.key("cancelled", other_job.id))
    await rig.adapter.ownership.ended(other_job.conversation, other_job.id)
    await rig.post_event(event_body(message("stop", user="U0THIRD", thread_ts=first["ts"])))
    [refusal] = await rig.fake.wait_for(lambda: ephemerals(rig, "U0THIRD"))
    assert refusal["text"] == f"Only <@{USER}> or a moderator can stop this run."
    assert not await stopped(rig, mine)

    rig.fake.set_user(ADMIN, is_owner=True)
    await rig.post_event(event_body(message("stop", user=ADMIN, thread_ts=first["ts"])))
    assert await stopped(rig, mine)


async def test_reset_is_the_thread_starters_or_a_moderators_and_rate_limited(make_rig):
    rig = await make_rig(rate_reset_per_min=1)
    first, _, _ = await started(rig)
    await rig.post_event(event_body(message("reset", user=OTHER, thread_ts=first["ts"])))
    [refusal] = await rig.fake.wait_for(lambda: ephemerals(rig, OTHER))
    assert refusal["text"] == f"Only <@{USER}>, who started this conversation, or a moderator can reset it."
    assert [j.kind for j in await rig.jobs()] == ["message"]

    await rig.post_event(event_body(message("reset", thread_ts=first["ts"])))
    assert [j.kind for j in await rig.jobs()] == ["message", "reset"]
    await rig.post_event(event_body(message("reset", thread_ts=first["ts"])))  # over 1 a minute
    [slow] = await rig.fake.wait_for(lambda: ephemerals(rig, USER))
    assert slow["text"].startswith("You're resetting sessions faster than 1 per minute; try again in ")
    assert [j.kind for j in await rig.jobs()] == ["message", "reset"]

    # The message shortcut: the same rules, plus the channel allowlist it used to skip.
    rig.fake.set_user(ADMIN, is_admin=True)
    shortcut = {"type": "message_action", "callback_id": "codeloop_reset", "trigger_id": "t2",
                "team": {"id": TEAM}, "user": {"id": ADMIN}, "channel": {"id": CHANNEL},
                "message": {"ts": first["ts"], "text": "hi"}}
    await rig.post_interaction(shortcut)
    assert [j.kind for j in await rig.jobs()] == ["message", "reset", "reset"]
    elsewhere = await make_rig(slack_allowed_channels="C0ELSEWHERE")
    await elsewhere.post_interaction({**shortcut, "trigger_id": "t3", "user": {"id": USER}})
    [off] = await elsewhere.fake.wait_for(lambda: [c for c in ephemerals(elsewhere, USER)
                                                   if "not enabled" in c["text"]])
    assert off["channel"] == CHANNEL
    assert [j.kind for j in await rig.jobs()] == ["message", "reset", "reset"]


@pytest.mark.parametrize("name", ["<!channel> report.exe", "<https://evil.example|payroll>.exe", "a&b<!here>.exe"])
async def test_a_refused_file_name_is_shown_as_typed_never_as_a_ping_or_link(make_rig, name):
    rig = await make_rig()
    bad = rig.fake.add_file("x.exe", b"MZ")
    bad["name"] = bad["title"] = name
    await rig.post_event(event_body(mention("<@UBOT> run it", files=[bad])))
    [notice] = await rig.fake.wait_for(lambda: ephemerals(rig, USER))
    text = notice["text"]
    assert "looks like an executable" in text
    assert "<" not in text and ">" not in text.replace("&gt;", "")
    assert name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in text
    assert all(name not in c.get("text", "") for c in rig.fake.calls_to("chat.postMessage"))


@pytest.mark.parametrize("name", ["evil.exe.", "evil.exe ", "evil.EXE. . ", "../evil.exe"])
async def test_executables_are_refused_by_the_name_they_would_land_as(make_rig, name):
    rig = await make_rig()
    ok = rig.fake.add_file("data.csv", b"a,b\n", "text/csv")
    bad = rig.fake.add_file("evil", b"MZ", "text/plain")
    bad["name"] = bad["title"] = name
    await rig.post_event(event_body(mention("<@UBOT> look", files=[ok, bad])))
    [job] = await rig.jobs()
    assert [a.name for a in job.attachments] == ["data.csv"]
    [notice] = await rig.fake.wait_for(lambda: ephemerals(rig, USER))
    assert "looks like an executable" in notice["text"]


async def test_a_lone_surrogate_in_a_file_name_is_enqueued_as_a_replacement_character(make_rig):
    rig = await make_rig()
    shared = rig.fake.add_file("data.csv", b"a,b\n", "text/csv")
    shared["name"] = "data\ud83d\x00.csv"  # half an emoji, as a client's JSON can carry it, and a NUL
    resp = await rig.post_event(event_body(mention("<@UBOT> read it", files=[shared])))
    assert resp.status == 200
    [job] = await rig.jobs()
    assert job.attachments[0].name == "data\ufffd.csv"
