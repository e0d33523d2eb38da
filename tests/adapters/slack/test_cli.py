"""``codeloop slack`` start-up checks, and the manifest agreeing with the code."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
import yaml

from bot.adapters.slack import cli
from bot.adapters.slack.inbound import EXPORT_SHORTCUT, RESET_SHORTCUT
from bot.core.errors import ConfigError
from bot.core.settings import Settings

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "slack-manifest.yml"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.main(parser.parse_args(argv))


def test_missing_tokens_are_all_named_before_connecting():
    with pytest.raises(ConfigError, match="CODELOOP_SLACK_BOT_TOKEN, CODELOOP_SLACK_APP_TOKEN"):
        run([])
    with pytest.raises(ConfigError, match="CODELOOP_SLACK_BOT_TOKEN, CODELOOP_SLACK_SIGNING_SECRET"):
        run(["--mode", "http"])


def test_a_bot_token_in_place_of_the_app_token_is_caught(monkeypatch):
    monkeypatch.setenv("CODELOOP_SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("CODELOOP_SLACK_APP_TOKEN", "xoxb-2")
    with pytest.raises(ConfigError, match="app-level token"):
        run([])


async def test_socket_mode_receives_events_acks_them_and_enqueues(make_settings, fake_slack, redis_client):
    from bot.core.jobs import Job
    from tests.adapters.slack.conftest import event_body, mention

    settings = make_settings(slack_bot_token=fake_slack.token, slack_app_token=fake_slack.app_token,
                             slack_api_url=fake_slack.api_url)
    stop = asyncio.Event()
    server = asyncio.create_task(cli.serve(settings, stop))
    try:
        event = mention()
        envelope = await fake_slack.send_envelope("events_api", event_body(event, "EvSocket"))
        await fake_slack.wait_for(lambda: any(a.get("envelope_id") == envelope for a in fake_slack.socket_acks))
        [(_, fields)] = await redis_client.xrange(settings.key("jobs"))
        job = Job.loads(fields[b"job"])
        assert job.idempotency_key == "EvSocket" and job.conversation.thread == event["ts"]
        [status] = await fake_slack.wait_for(lambda: fake_slack.calls_to("chat.postMessage"))
        assert status["thread_ts"] == event["ts"]
        assert fake_slack.calls_to("apps.connections.open:unauthorized") == []
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_http_mode_serves_until_stopped(make_settings, fake_slack, redis_client):
    import aiohttp

    from bot.bench.ack import _free_port

    port = _free_port()
    settings = make_settings(slack_mode="http", slack_bot_token=fake_slack.token, slack_signing_secret="s",
                             slack_api_url=fake_slack.api_url, slack_http_host="127.0.0.1", slack_http_port=port)
    stop = asyncio.Event()
    server = asyncio.create_task(cli.serve(settings, stop))
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the HTTP endpoint never came up")
        async with http.post(f"http://127.0.0.1:{port}/slack/events", data="{}") as resp:
            assert resp.status == 401
    stop.set()
    await asyncio.wait_for(server, 10)


def test_manifest_subscribes_to_what_the_app_handles():
    manifest = yaml.safe_load(MANIFEST.read_text())
    settings = manifest["settings"]
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is True
    assert set(settings["event_subscriptions"]["bot_events"]) == {
        "app_mention", "message.channels", "message.groups", "message.im"}
    assert [s["callback_id"] for s in manifest["features"]["shortcuts"]] == [RESET_SHORTCUT, EXPORT_SHORTCUT]
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert scopes == {"app_mentions:read", "chat:write", "reactions:write", "files:read", "files:write",
                      "channels:history", "groups:history", "im:history", "commands", "users:read"}
    assert Settings.model_fields["slack_api_url"].default == "https://slack.com/api/"
