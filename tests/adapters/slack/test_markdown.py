"""The model's Markdown as Slack mrkdwn: unit checks of the converter, then through the real
adapter against the fake Web API while a reply streams."""

from __future__ import annotations

import asyncio
import re

from bot.adapters.slack.markdown import to_mrkdwn
from tests.adapters.slack.conftest import CHANNEL
from tests.adapters.slack.test_render import fences_balanced, start_job

REPLY = (
    "## Result\n"
    "The **mean** is *42* and ~~41~~ was wrong; see [the docs](https://example.org/a?b=1&c=2).\n"
    "- first item with `a**b`\n"
    "  * nested\n"
    "1. numbered\n"
    "> a quote with **bold**\n"
    "```python\n"
    "x = 2**3 < 4  # **not bold**\n"
    "```\n"
    "Done <!channel> <https://evil.example|bank>."
)


def test_bold_italic_strike_headings_lists_quotes_and_links():
    out = to_mrkdwn(REPLY)
    lines = out.split("\n")
    assert lines[0] == "*Result*"
    assert lines[1] == ("The *mean* is _42_ and ~41~ was wrong; see the docs "
                        "(<https://example.org/a?b=1&amp;c=2>).")
    assert lines[2] == "• first item with `a**b`"
    assert lines[3] == "  • nested"
    assert lines[4] == "1. numbered"
    assert lines[5] == ">a quote with *bold*"
    # a fence's language would show as a code line in Slack; code is escaped, never converted
    assert lines[6:9] == ["```", "x = 2**3 &lt; 4  # **not bold**", "```"]
    # the model's text cannot ping or form a masked link
    assert lines[9] == "Done &lt;!channel&gt; &lt;https://evil.example|bank&gt;."


def test_no_raw_double_star_outside_code_and_masked_links_show_their_address():
    assert to_mrkdwn("x**2 is **big") == "x\u2217\u22172 is \u2217\u2217big"
    assert to_mrkdwn("[https://a.example](https://b.example)") == "https://a.example (<https://b.example>)"
    assert to_mrkdwn("[a](https://b.example/x|y)") == "a (https://b.example/x|y)"  # no | inside <…>
    assert to_mrkdwn("[run](javascript:alert)") == "run (javascript:alert)"
    assert to_mrkdwn("# **Big** title") == "*Big title*"


def outside_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_every_prefix_of_a_streaming_reply_renders_safely():
    for end in range(1, len(REPLY) + 1):
        out = to_mrkdwn(REPLY[:end])
        assert fences_balanced(out), REPLY[:end]
        assert "**" not in outside_code(out), REPLY[:end]
        assert "<!" not in out and "|bank>" not in out


async def test_streamed_markdown_reaches_slack_as_mrkdwn_at_every_edit(make_rig):
    rig = await make_rig(edit_interval=0.05)
    event, _job, emit = await start_job(rig)
    for i in range(0, len(REPLY), 7):
        await emit("delta", text=REPLY[i:i + 7], round=0)
        await asyncio.sleep(0.02)
    await emit("final", text=REPLY, rounds=0, ok=True)
    await rig.fake.wait_for(lambda: rig.fake.reactions)
    [body] = rig.fake.thread(CHANNEL, event["ts"])[1:]
    assert body["text"] == to_mrkdwn(REPLY)
    assert body["edits"] >= 2, "the reply should have been streamed"
    seen = [call["text"] for call in rig.fake.calls_to("chat.update") if call.get("ts") == body["ts"]]
    assert seen, "no edits observed"
    for text in seen:
        assert fences_balanced(text) and "**" not in outside_code(text) and "##" not in text
