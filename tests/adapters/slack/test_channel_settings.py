"""``/codeloop``: a channel's settings, by workspace admins only, through the adapter's real HTTP
endpoint (signed like Slack signs slash commands), the fake Web API and real Redis. The worker's
side (the settings applied to jobs): tests/worker/test_channel_settings.py."""

from __future__ import annotations

import itertools
from typing import Any
from urllib.parse import urlencode

import pytest

from bot.adapters.slack.app import EVENTS_PATH
from bot.adapters.slack.channel_settings import NOT_ADMIN, NOT_IN_DM
from bot.queue.channel_config import CHANNEL_DISABLED, ChannelConfigs
from tests.adapters.slack.conftest import CHANNEL, TEAM, USER, event_body, mention, sign

pytestmark = pytest.mark.redis

ADMIN = "U0ADMIN"
_keys = itertools.count(1)


async def command(rig: Any, text: str, user: str = ADMIN, channel: str = CHANNEL) -> str:
    """``/codeloop <text>`` as Slack posts it; returns the ephemeral answer sent to its response_url."""
    key = f"cmd{next(_keys)}"
    form = {"token": "legacy", "team_id": TEAM, "team_domain": "fake", "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "analytics", "user_id": user,
            "user_name": user.lower(), "command": "/codeloop", "text": text, "api_app_id": "A0001",
            "is_enterprise_install": "false", "response_url": rig.fake.response_url(key), "trigger_id": "trig"}
    raw = urlencode(form)
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(raw)}
    async with rig.http.post(rig.url + EVENTS_PATH, data=raw, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.read()) == b""  # acked at once, empty: the answer follows via response_url
    [answer] = await rig.fake.wait_for(lambda: [c for c in rig.fake.calls_to("response_url") if c["key"] == key])
    assert answer["response_type"] == "ephemeral"
    return str(answer["text"])


async def stored(rig: Any, channel: str = CHANNEL) -> dict[bytes, bytes]:
    return dict(await rig.redis.hgetall(ChannelConfigs(rig.redis, rig.settings).key("slack", channel)))


async def test_only_admins_may_see_or_change_a_channels_settings(make_rig):
    rig = await make_rig(slack_moderators="U0MOD")
    rig.fake.set_user(ADMIN, is_admin=True)
    rig.fake.set_user("U0OWNER", is_owner=True)
    assert await command(rig, "set rounds 1", user=USER) == NOT_ADMIN
    assert await command(rig, "", user=USER) == NOT_ADMIN
    assert await stored(rig) == {}  # nothing changed
    assert "rounds: 1" in await command(rig, "set rounds 1", user=ADMIN)
    assert "rounds: 0" in await command(rig, "set rounds 0", user="U0OWNER")
    assert "rounds: 2" in await command(rig, "set rounds 2", user="U0MOD")  # CODELOOP_SLACK_MODERATORS
    assert (await stored(rig))[b"rounds"] == b"2" and (await stored(rig))[b"by"] == b"U0MOD"
    assert "Last changed by <@U0MOD>" in await command(rig, "show")
    # in a DM there is no channel to set up
    assert await command(rig, "set rounds 1", channel="D0DM") == NOT_IN_DM


async def test_show_set_reset_and_bad_values_answered_clearly(make_rig, model_server):
    rig = await make_rig(max_rounds=3, model_profiles=f"fast={model_server.url},big={model_server.url}|ds-33b")
    rig.fake.set_user(ADMIN, is_admin=True)
    shown = await command(rig, "")
    assert "codeloop in this channel: on" in shown
    assert "rounds: 3 (the default)" in shown and "profile: default (the default); offered: default, big, fast" in shown
    assert "prompt: (none)" in shown

    assert "rounds: 2 (the operator allows up to 3)" in await command(rig, "set rounds 2")
    assert "0 to 3 (the operator's maximum)" in await command(rig, "set rounds 4")  # never above the operator's
    assert "0 to 3" in await command(rig, "set rounds -1")
    assert "0 to 3" in await command(rig, "set rounds two")
    assert "profile: big;" in await command(rig, "set profile BIG")
    assert "no model profile `huge`; choose one of: default, big, fast" in await command(rig, "set profile huge")
    saved = await command(rig, "set prompt Answer in French.\n<!channel> <https://evil|x>")
    # one line, cleaned like user text, and inert where it is shown
    assert "“Answer in French. &lt;!channel&gt; &lt;https://evil|x&gt;”" in saved
    assert (await stored(rig))[b"prompt"] == b"Answer in French. <!channel> <https://evil|x>"
    assert "the limit is 300" in await command(rig, "set prompt " + "x" * 301)
    assert "There is no setting `colour`" in await command(rig, "set colour red")
    assert "Unknown command `frobnicate`" in await command(rig, "frobnicate")
    assert "`/codeloop set rounds <0-3>`" in await command(rig, "help")
    kept = await stored(rig)  # bad values changed nothing
    assert kept[b"rounds"] == b"2" and kept[b"profile"] == b"big"
    assert "prompt: (none)" in await command(rig, "set prompt")  # nothing after prompt removes it

    after_reset = await command(rig, "reset")
    assert after_reset.startswith("Back to the defaults here.") and "rounds: 3 (the default)" in after_reset
    assert await stored(rig) == {}


async def test_a_disabled_channel_refuses_requests_at_intake_until_enabled(make_rig):
    rig = await make_rig()
    rig.fake.set_user(ADMIN, is_admin=True)
    assert "codeloop in this channel: OFF" in await command(rig, "disable")
    event = mention("<@UBOT> print 1+1")
    await rig.post_event(event_body(event))
    [refusal] = await rig.fake.wait_for(lambda: [c for c in rig.fake.calls_to("chat.postEphemeral")
                                                 if c["user"] == USER])
    assert refusal["text"] == CHANNEL_DISABLED
    assert refusal["channel"] == CHANNEL and refusal["thread_ts"] == event["ts"]
    assert await rig.jobs() == []  # no job, no status message
    assert not [c for c in rig.fake.calls_to("chat.postMessage") if c.get("blocks")]

    assert "codeloop in this channel: on" in await command(rig, "enable")
    await rig.post_event(event_body(mention("<@UBOT> print 1+1")))
    [job] = await rig.jobs()  # enqueued before the ack
    assert job.conversation.channel == CHANNEL


@pytest.mark.docker
async def test_end_to_end_the_admins_profile_and_round_limit_run_the_job_and_show_in_its_status(
        make_rig, start_worker, model_server):
    """Slack → adapter → Redis → real worker: the job goes to the profile's server under its served
    name, with the admin's round limit, and the status line says so."""
    from tests.fakes.model_server import ScriptedModelServer

    big = await ScriptedModelServer(script=["Big says hi."], served_model="ds-33b").start()
    try:
        profiles = f"big={big.url}|ds-33b"
        rig = await make_rig(model_profiles=profiles, max_rounds=3)
        await start_worker(slack_bot_token=rig.fake.token, model_profiles=profiles, max_rounds=3)
        rig.fake.set_user(ADMIN, is_admin=True)
        await command(rig, "set profile big")
        assert "up to 3" in await command(rig, "set rounds 1")
        event = mention("<@UBOT> say hi")
        await rig.post_event(event_body(event))
        await rig.fake.wait_for(lambda: [r for r in rig.fake.reactions if r[1] == event["ts"]], within=120)
        status = rig.fake.thread(CHANNEL, event["ts"])[0]
        assert status["text"] == ":white_check_mark: Done (1 round) · model: big · up to 1 fix"
        assert [r["model"] for r in big.requests] == ["ds-33b"] and model_server.requests == []
    finally:
        await big.stop()


async def test_the_status_line_shows_a_channels_own_setup_while_running(make_rig):
    from bot.core.jobs import Event
    from bot.queue.stream import JobQueue

    rig = await make_rig(edit_interval=0.1)
    event = mention("<@UBOT> print 1+1")
    await rig.post_event(event_body(event))
    [job] = await rig.jobs()
    [status] = await rig.fake.wait_for(lambda: rig.fake.thread(CHANNEL, event["ts"]))
    queue = JobQueue(rig.redis, rig.settings)
    await queue.publish(job.reply_stream, Event(job_id=job.id, conversation=job.conversation, seq=1, type="status",
                                                payload={"text": "thinking", "setup": "model: <big> · no fixes"},
                                                meta=job.meta))
    shown = ":hourglass_flowing_sand: thinking · model: &lt;big&gt; · no fixes"  # escaped
    await rig.fake.wait_for(lambda: [c for c in rig.fake.calls_to("chat.update")
                                     if c["ts"] == status["ts"] and c["text"] == shown])


def test_the_manifest_declares_the_command():
    from pathlib import Path

    import yaml

    manifest = yaml.safe_load((Path(__file__).resolve().parents[3] / "deploy" / "slack-manifest.yml").read_text())
    [cmd] = manifest["features"]["slash_commands"]
    assert cmd["command"] == "/codeloop" and "commands" in manifest["oauth_config"]["scopes"]["bot"]
