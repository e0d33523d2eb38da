"""Two Slack renderers under render leases, in one process against the fake Web API: the one that
took the mention posts the status message, the other renders the job, and the status message
still ends with the final line when the job ends before that post lands (else it would say
"Working on it…" for good)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bot.adapters.slack.app import make_client
from bot.adapters.slack.inbound import Where
from bot.adapters.slack.render import SlackRenderer
from bot.core.jobs import Conversation, Event, Job
from bot.queue.render_lease import RenderLeases
from tests.adapters.slack.conftest import CHANNEL, USER
from tests.fakes.slack_api import FakeSlackAPI

pytestmark = pytest.mark.redis


async def test_a_job_quicker_than_the_other_replicas_status_post_still_ends_it(
        fake_slack: FakeSlackAPI, slack_settings: Any, redis_client: Any) -> None:
    settings = slack_settings()
    renderers = []
    for name in ("took-mention", "renders"):
        leases = RenderLeases(redis_client, settings, "slack", replica=name)
        renderers.append(SlackRenderer(make_client(settings), redis_client, settings, edit_interval=0.05,
                                       leases=leases))
    took, renders = renderers
    conv = Conversation(platform="slack", workspace="T0001", channel=CHANNEL, thread="1.000001")
    meta = {"channel": CHANNEL, "thread_ts": "1.000001", "message_ts": "1.000001", "user": USER}
    job = Job(idempotency_key="Ev1", conversation=conv, user=USER, text="hi", reply_stream="r", meta=meta)
    assert renders.leases is not None and await renders.leases.own(job.id)  # it routed the first event
    for seq, (kind, payload) in enumerate([("delta", {"text": "the answer"}),
                                           ("final", {"text": "the answer", "rounds": 1})], start=1):
        event = Event(job_id=job.id, conversation=conv, seq=seq, type=kind, payload=payload, meta=meta)  # type: ignore[arg-type]
        await renders.deliver(event, f"{seq}-0")
    await asyncio.sleep(0.1)  # the final is in; the status message is not posted yet
    took.start_job(job, Where(CHANNEL, "1.000001", "1.000001"))
    for _ in range(300):
        if fake_slack.reactions:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    for r in renderers:
        await r.close()
    texts = [m["text"] for m in fake_slack.thread(CHANNEL, "1.000001")]
    # in this race the status message lands below the answer; what matters is that it ends
    assert sorted(texts) == [":white_check_mark: Done (1 round)", "the answer"], texts
    assert fake_slack.reactions == [(CHANNEL, "1.000001", "white_check_mark")]
    assert not took.views and not renders.views
