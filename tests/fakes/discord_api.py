"""A fake Discord: a REST server on 127.0.0.1 that records every call, plus the gateway payloads
Discord would send, so discord.py's own parsing builds its objects for tests.

Point discord.py at ``fake.api_url`` (``CODELOOP_DISCORD_API_URL``). It speaks the parts codeloop
uses, answering with the JSON Discord answers with: login (users/@me, oauth2/applications/@me),
command sync, interaction callbacks (``with_response``), the original response and follow-up
webhooks, channel messages (JSON or multipart with ``files[n]``; one read by id, a reply with the message it
references), history, edits, deletes, threads, and a CDN
for attachments. Bot routes check the ``Bot <token>`` header; webhook routes need none, as on
Discord. ``fail_next(method, path_re, status)`` answers the next matching call with an error (a
429 carries ``retry_after``), so discord.py's own retry handling runs for real.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, web

from tests.fakes.http_recorder import HTTPRecorder

EPOCH_MS = 1420070400000  # Discord's snowflake epoch


@dataclass
class Call:
    method: str
    path: str  # without the /api/v10 prefix
    json: Any = None
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # attachment index -> (name, data)
    auth: str | None = None
    query: dict[str, str] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def user_json(user_id: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "global_name": name, "discriminator": "0", "avatar": None,
            "bot": bot, "public_flags": 0, "flags": 0}


class FakeDiscord(HTTPRecorder[Call]):
    def __init__(self, token: str = "bot-token-for-tests", application_id: int = 1100000000000000001,
                 guild_id: int = 1200000000000000001, channel_id: int = 1300000000000000001) -> None:
        super().__init__()
        self.token = token
        self.application_id = application_id
        self.bot_user = user_json(application_id, "codeloop", bot=True)
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.messages: dict[int, dict[str, Any]] = {}  # id -> message JSON as it stands now
        self.files: dict[str, bytes] = {}  # CDN path -> bytes
        self.commands: list[dict[str, Any]] = []
        self.originals: dict[str, int] = {}  # interaction token -> message id of its response
        self.interactions: dict[str, dict[str, Any]] = {}  # token -> the interaction, as sent to the bot
        self._failures: list[tuple[str, re.Pattern[str], int]] = []
        self._seq = itertools.count(1)

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"{self.base}/api/v10"

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/api/v10/{path:.*}", self._api)
        app.router.add_get("/attachments/{path:.*}", self._cdn)

    def describe(self, call: Call) -> object:
        return call.method, call.path

    # --- for tests ------------------------------------------------------------------------------
    def snowflake(self) -> int:
        return ((int(time.time() * 1000) - EPOCH_MS) << 22) | (next(self._seq) & 0x3FFFFF)

    def fail_next(self, method: str, path_re: str, status: int) -> None:
        self._failures.append((method, re.compile(path_re), status))

    def find(self, method: str, path_re: str) -> list[Call]:
        pattern = re.compile(path_re)
        return [c for c in self.calls if c.method == method and pattern.fullmatch(c.path)]

    def in_channel(self, channel_id: int | str) -> list[dict[str, Any]]:
        """Messages of a channel as they stand now, oldest first."""
        return sorted((m for m in self.messages.values() if m["channel_id"] == str(channel_id)),
                      key=lambda m: int(m["id"]))

    def add_cdn_file(self, channel_id: int, name: str, data: bytes) -> dict[str, Any]:
        """Attachment JSON (as in a message or resolved interaction data) for a file the CDN serves."""
        att_id = self.snowflake()
        path = f"{channel_id}/{att_id}/{name}"
        self.files[path] = data
        url = f"{self.base}/attachments/{path}"
        return {"id": str(att_id), "filename": name, "size": len(data), "url": url, "proxy_url": url,
                "content_type": _mime(name)}

    # --- HTTP -----------------------------------------------------------------------------------
    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["path"])
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type=_mime(request.match_info["path"]))

    async def _api(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        auth = request.headers.get("Authorization")
        call = Call(request.method, path, auth=auth, query=dict(request.query))
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue  # discord.py sends a flat form, never nested multiparts
                if part.name == "payload_json":
                    call.json = json.loads(await part.text())
                elif part.name and part.name.startswith("files["):
                    call.files[part.name[6:-1]] = (part.filename or "", bytes(await part.read()))
        elif request.can_read_body:
            call.json = await request.json()
        self.calls.append(call)
        try:
            return await self._answer(call)
        finally:
            await self.changed()

    async def _answer(self, call: Call) -> web.StreamResponse:
        for i, (method, pattern, status) in enumerate(self._failures):
            if method == call.method and pattern.fullmatch(call.path):
                del self._failures[i]
                return _error(status)
        webhook = call.path.startswith(("/webhooks/", "/interactions/"))
        if not webhook and call.auth != f"Bot {self.token}":
            return _error(401)
        for method, route, handler in self._routes():
            match = re.fullmatch(route, call.path)
            if method == call.method and match:
                result = handler(call, *match.groups())
                if isinstance(result, web.Response):
                    return result
                return web.Response(status=204) if result is None else _json(result)
        return _error(404)

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        app = str(self.application_id)
        return [
            ("GET", "/users/@me", lambda c: self.bot_user),
            ("GET", "/oauth2/applications/@me", lambda c: self._application()),
            ("PUT", rf"/applications/{app}(?:/guilds/\d+)?/commands", self._sync),
            ("POST", r"/interactions/(\d+)/([\w.-]+)/callback", self._callback),
            ("PATCH", rf"/webhooks/{app}/([\w.-]+)/messages/(@original|\d+)", self._webhook_edit),
            ("GET", rf"/webhooks/{app}/([\w.-]+)/messages/(@original|\d+)", self._webhook_get),
            ("POST", rf"/webhooks/{app}/([\w.-]+)", self._followup),
            ("POST", r"/channels/(\d+)/messages", self._create),
            ("GET", r"/channels/(\d+)/messages", self._history),
            ("GET", r"/channels/(\d+)/messages/(\d+)", self._get_message),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", lambda c, ch, m: self._edit(int(m), c)),
            ("DELETE", r"/channels/(\d+)/messages/(\d+)", self._delete),
            ("POST", r"/channels/(\d+)/messages/(\d+)/threads", self._thread),
        ]

    # --- handlers -------------------------------------------------------------------------------
    def _application(self) -> dict[str, Any]:
        return {"id": str(self.application_id), "name": "codeloop", "icon": None, "description": "",
                "rpc_origins": [], "bot_public": True, "bot_require_code_grant": False, "bot": self.bot_user,
                "owner": user_json(1000000000000000009, "owner"), "team": None, "summary": "",
                "verify_key": "0" * 64, "flags": 1 << 19, "interactions_endpoint_url": None}

    def _sync(self, call: Call) -> list[dict[str, Any]]:
        self.commands = [{**cmd, "id": str(self.snowflake()), "application_id": str(self.application_id),
                          "version": str(self.snowflake())} for cmd in call.json]
        return self.commands

    def message(self, channel_id: int | str, content: str = "", author: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {
               "id": str(self.snowflake()), "channel_id": str(channel_id), "guild_id": str(self.guild_id),
               "author": author or self.bot_user, "content": content, "timestamp": _now(),
               "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
               "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0,
               "components": []}
        msg.update(extra)
        return msg

    def _store(self, msg: dict[str, Any], call: Call) -> dict[str, Any]:
        body = call.json or {}
        for key in ("content", "components", "flags"):
            if key in body:
                msg[key] = body[key] if body[key] is not None else ([] if key == "components" else "")
        if "message_reference" in body:
            ref = body["message_reference"]  # Discord answers with snowflakes as strings
            msg["message_reference"] = {k: str(v) if k.endswith("_id") else v for k, v in ref.items()}
            msg["type"] = 19
        if call.files:
            ordered = sorted(call.files.items(), key=lambda kv: int(kv[0]))
            channel = int(msg["channel_id"])
            msg["attachments"] = [self.add_cdn_file(channel, name, data) for _, (name, data) in ordered]
        self.messages[int(msg["id"])] = msg
        return msg

    def _history(self, call: Call, channel_id: str) -> list[dict[str, Any]]:
        """A channel's messages newest first, ``before`` a message id, at most ``limit`` (≤ 100)."""
        before = int(call.query.get("before") or 1 << 63)
        limit = min(int(call.query.get("limit") or 50), 100)
        older = [m for m in self.in_channel(channel_id) if int(m["id"]) < before]
        return list(reversed(older))[:limit]

    def _get_message(self, call: Call, channel_id: str, message_id: str) -> dict[str, Any] | web.Response:
        """One message as it stands; a reply carries the message it references as Discord sends
        it (one level deep: that one's own ``referenced_message`` is left out; null if deleted)."""
        msg = self.messages.get(int(message_id))
        if msg is None or msg["channel_id"] != channel_id:
            return _error(404)
        out = {k: v for k, v in msg.items() if k != "referenced_message"}
        ref = msg.get("message_reference") or {}
        if ref.get("message_id"):
            linked = self.messages.get(int(ref["message_id"]))
            out["referenced_message"] = ({k: v for k, v in linked.items() if k != "referenced_message"}
                                         if linked is not None else None)
        return out

    def _create(self, call: Call, channel_id: str) -> dict[str, Any]:
        return self._store(self.message(channel_id), call)

    def _edit(self, message_id: int, call: Call) -> dict[str, Any] | web.Response:
        msg = self.messages.get(message_id)
        if msg is None:
            return _error(404)
        msg["edited_timestamp"] = _now()
        return self._store(msg, call)

    def _delete(self, call: Call, channel_id: str, message_id: str) -> web.Response | None:
        return None if self.messages.pop(int(message_id), None) else _error(404)

    def _callback(self, call: Call, interaction_id: str, token: str) -> dict[str, Any] | web.Response:
        kind = call.json["type"]
        data = call.json.get("data") or {}
        sent = self.interactions.get(token)
        if sent is None:
            return _error(404)
        out: dict[str, Any] = {"interaction": {"id": interaction_id, "type": sent["type"]},
                               "resource": {"type": kind}}
        if kind in (4, 5):  # a message (or the "thinking…" placeholder that becomes one)
            flags = (data.get("flags") or 0) | (128 if kind == 5 else 0)
            sent = self.interactions[token]
            metadata = {"id": interaction_id, "type": sent["type"], "user": sent["member"]["user"],
                        "authorizing_integration_owners": sent["authorizing_integration_owners"]}
            msg = self._store(self.message(sent["channel_id"], flags=flags, interaction_metadata=metadata),
                              Call("POST", "", {"content": data.get("content", "")}))
            self.originals[token] = int(msg["id"])
            out["interaction"].update(response_message_id=msg["id"], response_message_loading=kind == 5,
                                      response_message_ephemeral=bool(flags & 64))
            out["resource"]["message"] = msg
        return out

    def _webhook_edit(self, call: Call, token: str, which: str) -> dict[str, Any] | web.Response:
        message_id = self.originals.get(token) if which == "@original" else int(which)
        if message_id is None:
            return _error(404)
        self.messages[message_id]["flags"] &= ~128  # the edit ends the "thinking…" state
        return self._edit(message_id, call)

    def _webhook_get(self, call: Call, token: str, which: str) -> dict[str, Any] | web.Response:
        message_id = self.originals.get(token) if which == "@original" else int(which)
        return self.messages[message_id] if message_id in self.messages else _error(404)

    def _followup(self, call: Call, token: str) -> dict[str, Any]:
        return self._store(self.message(self.interactions[token]["channel_id"]), call)

    def _thread(self, call: Call, channel_id: str, message_id: str) -> dict[str, Any]:
        # A thread started from a message has that message's id, as on Discord.
        return {"id": message_id, "type": 11, "guild_id": str(self.guild_id), "parent_id": channel_id,
                "owner_id": str(self.application_id), "name": call.json["name"], "last_message_id": None,
                "rate_limit_per_user": 0, "message_count": 0, "member_count": 1, "total_message_sent": 0,
                "flags": 0, "thread_metadata": {
                    "archived": False, "locked": False, "archive_timestamp": _now(),
                    "create_timestamp": _now(),
                    "auto_archive_duration": call.json.get("auto_archive_duration", 1440)}}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json", as Discord sends it: discord.py parses JSON only on that header.
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


def _error(status: int) -> web.Response:
    if status == 429:
        body = {"message": "You are being rate limited.", "retry_after": 0.05, "global": False}
        headers = {"Retry-After": "0.05", "X-RateLimit-Scope": "user"}
        return _json(body, status=429, headers=headers)
    messages = {401: (0, "401: Unauthorized"), 403: (50013, "Missing Permissions"),
                404: (10008, "Unknown Message"), 500: (0, "500: Internal Server Error")}
    code, text = messages.get(status, (0, "error"))
    return _json({"message": text, "code": code}, status=status)


def _mime(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "jpg": "image/jpeg", "csv": "text/csv", "txt": "text/plain; charset=utf-8",
            "json": "application/json"}.get(ext, "application/octet-stream")
