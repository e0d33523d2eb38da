"""A fake Slack Web API: a real aiohttp server on 127.0.0.1 that records every call.

Point ``AsyncWebClient(base_url=fake.api_url)`` at it. It speaks the parts codeloop uses:
auth.test, chat.postMessage / update / delete / postEphemeral, reactions.add, users.info
(everyone an ordinary member unless ``set_user`` makes them an admin or owner),
conversations.replies, the three steps of files_upload_v2 (getUploadURLExternal, the upload URL,
completeUploadExternal), ``url_private_download`` downloads of files registered with
``add_file`` (bearer token checked, like Slack's file servers; a worker reaches them only with
``download_test_hosts=fake.test_host``), and Socket Mode: apps.connections.open (app token)
hands out a WebSocket URL on which ``send_envelope`` pushes payloads and the app's acks are
recorded; slash commands' ``response_url`` (``response_url(key)``: posts there are recorded as
calls). ``fail_next(method, 429)`` makes a method answer with a rate limit first, so retry
handling is exercised for real.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.http_recorder import HTTPRecorder


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Upload:
    file_id: str
    filename: str
    length: int
    data: bytes = b""
    title: str | None = None
    channel: str | None = None
    thread_ts: str | None = None
    initial_comment: str | None = None


class FakeSlackAPI(HTTPRecorder[Call]):
    def __init__(self, token: str = "xoxb-test-token", bot_user_id: str = "UBOT", bot_id: str = "BBOT",
                 team_id: str = "T0001", app_token: str = "xapp-test-token") -> None:
        super().__init__()
        self.token = token
        self.app_token = app_token
        self.socket_acks: list[dict[str, Any]] = []
        self._sockets: list[web.WebSocketResponse] = []
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.team_id = team_id
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.uploads: dict[str, Upload] = {}
        #: people's messages (``add_message``): conversations.replies reads them with the bot's
        self.people: dict[tuple[str, str], dict[str, Any]] = {}
        self.reactions: list[tuple[str, str, str]] = []
        self.users: dict[str, dict[str, Any]] = {}
        self._files: dict[str, tuple[bytes, str]] = {}
        self._failures: dict[str, list[int]] = {}
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)

    # --- lifecycle ----------------------------------------------------------------------------
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/files/{key}/{name}", self._download)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/respond/{key}", self._respond)

    def describe(self, call: Call) -> object:
        return call.method

    async def close(self) -> None:
        for ws in self._sockets:
            await ws.close()
        await super().close()

    @property
    def api_url(self) -> str:
        return self.base + "/api/"

    # --- test helpers ------------------------------------------------------------------------
    def add_file(self, name: str, data: bytes, mime: str = "application/octet-stream") -> dict[str, Any]:
        """Register a file a user shared; returns the file object as it appears in an event."""
        key = f"F{next(self._ids):06d}"
        self._files[f"{key}/{name}"] = (data, mime)
        url = f"{self.base}/files/{key}/{name}"
        return {"id": key, "name": name, "title": name, "mimetype": mime, "filetype": name.rsplit(".", 1)[-1],
                "size": len(data), "url_private": url, "url_private_download": url}

    def add_message(self, channel: str, user: str, text: str, thread_ts: str | None = None,
                    **extra: Any) -> dict[str, Any]:
        """A person's message already in ``channel`` (in the thread ``thread_ts``, or a new
        top-level one that a thread can hang from); ``extra``: files, user_profile…"""
        ts = self._next_ts()
        message = {"type": "message", "user": user, "text": text, "ts": ts, "thread_ts": thread_ts, **extra}
        self.people[(channel, ts)] = message
        if thread_ts is not None and (channel, thread_ts) in self.people:
            self.people[(channel, thread_ts)]["thread_ts"] = thread_ts  # a parent carries its own ts
        return message

    def set_user(self, user_id: str, **fields: Any) -> None:
        """What users.info says about a user, e.g. ``set_user("U1", is_admin=True)``."""
        self.users[user_id] = {**self.users.get(user_id, {}), **fields}

    async def send_envelope(self, kind: str, payload: dict[str, Any]) -> str:
        """Push a Socket Mode envelope (``events_api``, ``interactive``…) to the connected app."""
        await self.wait_for(lambda: self._sockets)
        envelope_id = uuid.uuid4().hex
        await self._sockets[-1].send_json({"envelope_id": envelope_id, "type": kind, "payload": payload,
                                           "accepts_response_payload": False, "retry_attempt": 0,
                                           "retry_reason": ""})
        return envelope_id

    def response_url(self, key: str = "cmd") -> str:
        """A slash command's ``response_url``: what is posted there is recorded as a call to
        ``response_url`` (its JSON body, plus ``key``)."""
        return f"{self.base}/respond/{key}"

    def fail_next(self, method: str, status: int, times: int = 1) -> None:
        self._failures.setdefault(method, []).extend([status] * times)

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        return [c.args for c in self.calls if c.method == method]

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """Bot messages in a thread, oldest first, as they read now (after updates)."""
        return sorted((m for (ch, _), m in self.messages.items()
                       if ch == channel and m.get("thread_ts") == thread_ts), key=lambda m: float(m["ts"]))

    # --- handlers -------------------------------------------------------------------------------
    async def _record(self, method: str, args: dict[str, Any]) -> None:
        self.calls.append(Call(method, args))
        await self.changed()

    async def _args(self, request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                args.update(await request.json())
            else:
                args.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        return args

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        failures = self._failures.get(method)
        if failures:
            status = failures.pop(0)
            await self._record(method + ":failed", args)
            return web.json_response({"ok": False, "error": "ratelimited"}, status=status,
                                     headers={"Retry-After": "0"} if status == 429 else {})
        token = self.app_token if method == "apps.connections.open" else self.token
        if request.headers.get("Authorization") != f"Bearer {token}":
            await self._record(method + ":unauthorized", args)
            return web.json_response({"ok": False, "error": "invalid_auth"})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            await self._record(method + ":unknown", args)
            return web.json_response({"ok": False, "error": "unknown_method"}, status=404)
        body = handler(args)
        await self._record(method, args)
        return web.json_response({"ok": True, **body} if "error" not in body else {"ok": False, **body})

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _m_auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": "https://fake.slack.com/", "team": "Fake", "user": "codeloop", "team_id": self.team_id,
                "user_id": self.bot_user_id, "bot_id": self.bot_id, "is_enterprise_install": False}

    def _m_apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": self.base.replace("http://", "ws://") + "/socket"}

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("channel") or not (args.get("text") or args.get("blocks")):
            return {"error": "no_text" if args.get("channel") else "channel_not_found"}
        if len(args.get("text") or "") > 4000:
            return {"error": "msg_too_long"}
        ts = self._next_ts()
        message = {"ts": ts, "text": args.get("text", ""), "blocks": args.get("blocks"),
                   "user": self.bot_user_id, "bot_id": self.bot_id,
                   "thread_ts": args.get("thread_ts") or None,
                   "edits": 0}
        self.messages[(args["channel"], ts)] = message
        return {"channel": args["channel"], "ts": ts, "message": message}

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"message_ts": self._next_ts()}

    def _m_chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self.messages.get((args.get("channel", ""), args.get("ts", "")))
        if message is None:
            return {"error": "message_not_found"}
        if len(args.get("text") or "") > 4000:
            return {"error": "msg_too_long"}
        message.update(text=args.get("text", message["text"]), edits=message["edits"] + 1)
        if "blocks" in args:
            message["blocks"] = args["blocks"] or None
        return {"channel": args["channel"], "ts": args["ts"], "text": message["text"]}

    def _m_chat_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.messages.pop((args.get("channel", ""), args.get("ts", "")), None) is None:
            return {"error": "message_not_found"}
        return {"channel": args["channel"], "ts": args["ts"]}

    def _m_reactions_add(self, args: dict[str, Any]) -> dict[str, Any]:
        self.reactions.append((args["channel"], args["timestamp"], args["name"]))
        return {}

    def _m_users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = str(args.get("user") or "")
        if not user:
            return {"error": "user_not_found"}
        base = {"id": user, "team_id": self.team_id, "name": user.lower(), "deleted": False, "is_bot": False,
                "is_admin": False, "is_owner": False, "is_primary_owner": False, "is_restricted": False}
        return {"user": {**base, **self.users.get(user, {})}}

    def _m_conversations_replies(self, args: dict[str, Any]) -> dict[str, Any]:
        """The thread oldest first, the parent included, at most ``limit`` (Slack's paging)."""
        channel, ts = args["channel"], args["ts"]
        people = [m for (ch, _), m in self.people.items()
                  if ch == channel and (m["ts"] == ts or m.get("thread_ts") == ts)]
        found = sorted([*people, *self.thread(channel, ts)], key=lambda m: float(m["ts"]))
        if not found:
            return {"error": "thread_not_found"}
        limit = int(args.get("limit") or 1000)
        return {"messages": found[:limit], "has_more": len(found) > limit}

    def _m_files_getUploadURLExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        file_id = f"F{next(self._ids):06d}"
        self.uploads[file_id] = Upload(file_id, args["filename"], int(args["length"]))
        return {"upload_url": f"{self.base}/upload/{file_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        files = json.loads(args["files"]) if isinstance(args["files"], str) else args["files"]
        out = []
        for f in files:
            upload = self.uploads.get(f["id"])
            if upload is None or len(upload.data) != upload.length:
                return {"error": "upload_incomplete"}
            upload.title = f.get("title")
            upload.channel = args.get("channel_id")
            upload.thread_ts = args.get("thread_ts")
            upload.initial_comment = args.get("initial_comment")
            out.append({"id": upload.file_id, "name": upload.filename, "title": upload.title})
        return {"files": out}

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {}})
        await self._record("socket_connect", {})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.socket_acks.append(json.loads(msg.data))
                await self._record("socket_ack", self.socket_acks[-1])
        self._sockets.remove(ws)
        return ws

    async def _respond(self, request: web.Request) -> web.Response:
        await self._record("response_url", {**await request.json(), "key": request.match_info["key"]})
        return web.Response(text="ok")

    async def _upload(self, request: web.Request) -> web.Response:
        upload = self.uploads.get(request.match_info["file_id"])
        if upload is None:
            return web.Response(status=404, text="no such upload")
        upload.data = await request.read()
        await self._record("upload", {"file_id": upload.file_id, "bytes": len(upload.data)})
        return web.Response(text="OK - " + str(len(upload.data)))

    async def _download(self, request: web.Request) -> web.Response:
        key = f"{request.match_info['key']}/{request.match_info['name']}"
        await self._record("download", {"key": key, "auth": request.headers.get("Authorization")})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            # Slack answers an unauthenticated file URL with its HTML login page, not an error code.
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        if key not in self._files:
            return web.Response(status=404)
        data, mime = self._files[key]
        return web.Response(body=data, content_type=mime)
