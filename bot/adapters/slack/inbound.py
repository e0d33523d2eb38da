"""Slack payloads → Jobs. Pure functions: no I/O, so every rule here is tested without a network.

Where a conversation lives:
  * a mention in a channel starts (or continues) the thread under the mentioning message;
  * a reply in a thread the bot has joined continues it without a mention (the caller checks
    "joined" in Redis; here it is the ``joined`` argument);
  * a top-level direct message continues the one DM conversation (thread key ``dm``, replies go
    top level); a threaded direct message is its own conversation, like a channel thread.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from typing import Any

from bot.adapters.common import is_allowed, parse_control
from bot.core.errors import InputRejected
from bot.core.jobs import Attachment, Conversation, Job
from bot.core.limits import InputLimits, Upload, check_text, partition_uploads
from bot.core.settings import Settings

DM_THREAD = "dm"
STOP_ACTION = "codeloop_stop"
RESET_SHORTCUT = "codeloop_reset"
EXPORT_SHORTCUT = "codeloop_export"
# Subtypes that are a person saying something; every other subtype (message_changed, _deleted,
# channel_join, bot_message, our own edits…) is not a request.
USER_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})
_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")


@dataclass(frozen=True)
class Where:
    """Where to answer: the channel, and the thread (None = top level of a DM)."""

    channel: str
    thread_ts: str | None
    message_ts: str


@dataclass
class Inbound:
    """What an incoming event asks for: a job to enqueue and/or notices to show the user (plain
    text, shown to that user only: the renderer escapes it and posts it ephemerally)."""

    where: Where
    user: str
    job: Job | None = None
    notices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StopPress:
    """A press of a job's Stop button: which job, whose, and who pressed it where."""

    job_id: str
    requester: str
    conversation: Conversation
    actor: str
    where: Where


NOT_ALLOWED_USER = "Sorry, you are not on this bot's list of allowed users."
DMS_OFF = "Direct messages to this bot are turned off; mention it in a channel where it is enabled."
CHANNEL_OFF = "codeloop is not enabled in this channel; ask an admin which channels it works in."


def is_dm(event: dict[str, Any]) -> bool:
    return event.get("channel_type") == "im" or str(event.get("channel", "")).startswith("D")


def is_from_person(event: dict[str, Any], bot_user_id: str | None) -> bool:
    """False for bots (us included), edits, deletions and system messages."""
    if event.get("bot_id") or event.get("subtype") not in USER_SUBTYPES or not event.get("user"):
        return False
    return event.get("user") != bot_user_id


def mentions(event: dict[str, Any], user_id: str | None) -> bool:
    return user_id is not None and any(m == user_id for m in _MENTION.findall(event.get("text") or ""))


def where_for(event: dict[str, Any]) -> Where:
    ts = str(event["ts"])
    thread = event.get("thread_ts")
    if is_dm(event) and thread is None:
        return Where(event["channel"], None, ts)
    return Where(event["channel"], str(thread or ts), ts)


def clean_text(text: str, bot_user_id: str | None) -> str:
    """Drop mentions of the bot and undo Slack's &amp; &lt; &gt; escaping, so the model sees plain text."""
    text = _MENTION.sub(lambda m: "" if m.group(1) == bot_user_id else m.group(0), text)
    return html.unescape(text).strip()


def translate(event: dict[str, Any], *, event_id: str, team_id: str, bot_user_id: str | None,
              settings: Settings, reply_stream: str, joined: bool) -> Inbound | None:
    """The Inbound for an ``app_mention`` or ``message`` event, or None when it is not for us."""
    if not is_from_person(event, bot_user_id):
        return None
    dm = is_dm(event)
    mentioned = event.get("type") == "app_mention"
    if not mentioned and not dm:
        # A mention inside a thread arrives twice (app_mention and message); answer the app_mention.
        if not joined or event.get("thread_ts") is None or mentions(event, bot_user_id):
            return None
    where = where_for(event)
    user = str(event["user"])
    inbound = Inbound(where, user)
    if not dm and not is_allowed(settings.slack_allowed_channels, where.channel):
        return None
    if dm and not settings.slack_dms_allowed:
        inbound.notices.append(DMS_OFF)
        return inbound
    if not is_allowed(settings.slack_allowed_users, user):
        if mentioned or dm:
            inbound.notices.append(NOT_ALLOWED_USER)
            return inbound
        return None

    limits = InputLimits.from_settings(settings)
    files = [(f, Upload(str(f.get("name") or f.get("title") or "file"), int(f.get("size") or 0),
                        str(f.get("mimetype") or "application/octet-stream")))
             for f in event.get("files") or [] if f.get("url_private_download") or f.get("url_private")]
    accepted, refused = partition_uploads(files, limits)
    inbound.notices.extend(refused)
    kind, text = parse_control(clean_text(event.get("text") or "", bot_user_id))
    if kind == "message":
        try:
            text = check_text(text, limits, has_files=bool(accepted))
        except InputRejected as exc:
            if refused and not accepted and not text.strip():
                return inbound  # the refusal already says what went wrong
            inbound.notices.append(exc.user_message())
            return inbound
    attachments = [Attachment(name=str(f.get("name") or "file"), size=int(f.get("size") or 0),
                              mime=str(f.get("mimetype") or "application/octet-stream"),
                              url=str(f.get("url_private_download") or f.get("url_private")), auth="slack")
                   for f in accepted] if kind == "message" else []
    inbound.job = Job(
        idempotency_key=event_id,
        conversation=conversation(team_id, where),
        user=user,
        text=text,
        attachments=attachments,
        kind=kind,
        reply_stream=reply_stream,
        meta=meta_for(where, user),
    )
    return inbound


def access_refusal(settings: Settings, channel: str, user: str) -> str | None:
    """Why ``user`` may not use the bot in ``channel`` (the message allowlists, applied to
    buttons and shortcuts too), or None."""
    if channel.startswith("D"):
        if not settings.slack_dms_allowed:
            return DMS_OFF
    elif not is_allowed(settings.slack_allowed_channels, channel):
        return CHANNEL_OFF
    if not is_allowed(settings.slack_allowed_users, user):
        return NOT_ALLOWED_USER
    return None


def conversation(team_id: str, where: Where) -> Conversation:
    return Conversation(platform="slack", workspace=team_id or "-", channel=where.channel,
                        thread=where.thread_ts or DM_THREAD)


def meta_for(where: Where, user: str) -> dict[str, Any]:
    """Echoed on every event: where to answer, and whose job it is (the Stop button names them)."""
    return {"channel": where.channel, "thread_ts": where.thread_ts, "message_ts": where.message_ts, "user": user}


def where_from_meta(meta: dict[str, Any], conv: Conversation) -> Where:
    """Where an event's job asked to be answered (falls back to the conversation key)."""
    thread = meta.get("thread_ts", None if conv.thread == DM_THREAD else conv.thread)
    return Where(str(meta.get("channel") or conv.channel), thread, str(meta.get("message_ts") or ""))


def stop_value(job_id: str, requester: str, conversation: Conversation) -> str:
    """What a job's Stop button carries: Slack echoes it back in the signed action payload."""
    return json.dumps({"job": job_id, "user": requester, "conversation": conversation.model_dump()},
                      separators=(",", ":"))


def stop_press(body: dict[str, Any]) -> StopPress | None:
    """A Stop button press, or None for a button without a job in it (from an older version,
    which named only the conversation)."""
    action = next((a for a in body.get("actions") or [] if a.get("action_id") == STOP_ACTION), None)
    if action is None:
        return None
    try:
        value = json.loads(action["value"])
        conv = Conversation.model_validate(value["conversation"])
        job_id, requester = str(value["job"]), str(value["user"])
    except (ValueError, KeyError, TypeError):
        return None
    return StopPress(job_id, requester, conv, actor_of(body), where_of_action(body))


def actor_of(body: dict[str, Any]) -> str:
    return str((body.get("user") or {}).get("id") or "")


def where_of_action(body: dict[str, Any]) -> Where:
    """Where to answer a button press or shortcut (ephemerally): its channel and thread."""
    container, message = body.get("container") or {}, body.get("message") or {}
    channel = str((body.get("channel") or {}).get("id") or container.get("channel_id") or "")
    thread = container.get("thread_ts") or message.get("thread_ts")
    return Where(channel, str(thread) if thread else None, str(message.get("ts") or ""))


def reset_job(body: dict[str, Any], reply_stream: str, kind: str = "reset") -> tuple[Job, Where] | None:
    """The "reset session" message shortcut → a ``reset`` Job for the thread the message is in (the
    "Export notebook" shortcut: an ``export`` Job)."""
    message = body.get("message") or {}
    channel = str((body.get("channel") or {}).get("id") or "")
    if not channel or "ts" not in message:
        return None
    event = {"channel": channel, "ts": message["ts"], "thread_ts": message.get("thread_ts"),
             "channel_type": "im" if channel.startswith("D") else "channel"}
    where = where_for(event)
    team = str((body.get("team") or {}).get("id") or "")
    user = str((body.get("user") or {}).get("id") or "")
    job = Job(idempotency_key=f"{kind}:{body.get('trigger_id') or message['ts']}",
              conversation=conversation(team, where), user=user, kind=kind,  # type: ignore[arg-type]
              reply_stream=reply_stream, meta=meta_for(where, user))
    return job, where
