"""The model's standard Markdown as Slack mrkdwn, escaped, safe to show at any point of a stream.

Why mrkdwn and not Slack's ``markdown`` block: the block is new, is not rendered by every client
(older desktop and mobile builds, notifications and the unfurl previews show only ``text``), has
no size-limited edit story for a reply edited once a second, and a message made of blocks still
needs a ``text`` fallback; a mrkdwn ``text`` renders everywhere a message does.

What is converted, outside code: ``**b**``/``__b__`` → ``*b*``, ``*i*``/``_i_`` → ``_i_``,
``~~s~~`` → ``~s~``, ``#`` headings → a bold line, ``-``/``*``/``+`` bullets → ``•``,
``> quote`` → a Slack quote, ``[text](url)`` → ``text (<url>)``: the real address in plain sight,
never a link that claims to be something else (as ``discord.format.inert`` does). Everything
else is escaped (``& < >``), so the model cannot form ``<!channel>`` pings or masked links.

Streaming: a fence the model has opened but not yet closed is closed for display, and emphasis
markers are only converted in pairs on one line; a ``**`` without its partner (``**Resu`` while
the word still streams) is shown as ``∗∗`` (U+2217), which is not markup, so no raw ``**``
reaches a mrkdwn field and nothing half-written turns the rest of a message bold.
"""

from __future__ import annotations

import re

FENCE = "```"
_FENCE_LINE = re.compile(r"^\s{0,3}```")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(?=\S)")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"\n]*\")?\s*\)")
_SAFE_URL = re.compile(r"(?:https?://|mailto:)[^\s|<>]+", re.IGNORECASE)
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_EM_STAR = re.compile(r"(?<![*\w])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
#: a placeholder for a span already rendered (code, links); private-use code points never typed
_HOLD = "\ue000{}\ue001"
_HELD = re.compile("\ue000(\\d+)\ue001")


def escape(text: str) -> str:
    """Slack's required escaping; it also keeps model text from forming <!channel> pings or links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(text: str) -> str:
    """Markdown (possibly cut mid-stream) as escaped Slack mrkdwn."""
    out: list[str] = []
    in_fence = False
    for line in text.split("\n"):
        if _FENCE_LINE.match(line):
            # Slack would show a fence's language as the first code line: every fence line is bare.
            out.append(FENCE)
            in_fence = not in_fence
            continue
        out.append(escape(line) if in_fence else _line(line))
    if in_fence:  # still streaming: close it for display
        while out and not out[-1].strip():
            out.pop()
        out.append(FENCE)
    return "\n".join(out)


def _line(line: str) -> str:
    if _RULE.match(line):
        return "──────────"
    heading = _HEADING.match(line)
    if heading:
        title = _inline(heading.group(2)).strip()
        return f"*{_unbold(title)}*" if title else ""
    prefix = ""
    quote = _QUOTE.match(line)
    if quote:
        prefix, line = ">", line[quote.end():]  # a literal > here is Slack's quote, not markup we fear
    bullet = _BULLET.match(line)
    if bullet:
        prefix += bullet.group(1) + "• "
        line = line[bullet.end():]
    return prefix + _inline(line)


def _unbold(text: str) -> str:
    """A heading is bold already; mrkdwn does not nest ``*``."""
    return text.replace("*", "")


def _inline(line: str) -> str:
    held: list[str] = []

    def hold(rendered: str) -> str:
        held.append(rendered)
        return _HOLD.format(len(held) - 1)

    line = _INLINE_CODE.sub(lambda m: hold("`" + escape(m.group(2).replace("`", "'")) + "`"), line)
    line = _LINK.sub(lambda m: hold(_link(m.group(1), m.group(2))), line)
    line = escape(line)
    line = _STRONG.sub(lambda m: hold("*" + _unbold(_em(m.group(1) or m.group(2))) + "*"), line)
    line = _em(line)
    line = _STRIKE.sub(r"~\1~", line)
    # what is left of the markers has no partner: not markup
    line = line.replace("**", "\u2217\u2217").replace("~~", "\u223c\u223c")
    while _HELD.search(line):
        line = _HELD.sub(lambda m: held[int(m.group(1))], line)
    return line


def _em(text: str) -> str:
    return _EM_STAR.sub(r"_\1_", text)


def _link(label: str, url: str) -> str:
    """``label (<url>)``: Slack links the address itself; the label stays plain text."""
    shown = escape(label.strip())
    if not _SAFE_URL.fullmatch(url):
        return f"{shown} ({escape(url)})" if shown else escape(url)
    if not shown or shown == url or shown == url.split("://", 1)[-1]:
        return f"<{escape(url)}>"
    return f"{shown} (<{escape(url)}>)"
