"""``FakeDiscord`` plus a gateway: what ``codeloop discord`` needs to connect and stay connected.

discord.py opens its gateway WebSocket at ``DiscordWebSocket.DEFAULT_GATEWAY``
(``CODELOOP_DISCORD_GATEWAY_URL`` points it here: ``fake.gateway_url``). The gateway speaks the
few opcodes a session needs: HELLO, IDENTIFY → READY (no guilds), heartbeats → ACK. With
``refuse_gateway`` set it answers the upgrade with 503, like a gateway outage. It also lists the
application's global commands (``GET /applications/{id}/commands``), which ``codeloop doctor``
reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.discord_api import Call, FakeDiscord

HEARTBEAT_MS = 41250


class GatewayDiscord(FakeDiscord):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refuse_gateway = False
        self.identified: list[dict[str, Any]] = []
        self._sockets: list[web.WebSocketResponse] = []

    @property
    def gateway_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/gateway/"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/gateway/", self._gateway)
        super().routes(app)

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        app = str(self.application_id)
        return [("GET", rf"/applications/{app}/commands", lambda c: self.commands), *super()._routes()]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        await super().close()

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(Call("WS", "/gateway", query=dict(request.query)))
        await self.changed()
        if self.refuse_gateway:
            return web.Response(status=503, text="gateway unavailable")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        seq = 0
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}, "s": None, "t": None}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                if payload.get("op") == 1:  # heartbeat
                    await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
                elif payload.get("op") == 2:  # identify
                    self.identified.append(payload["d"])
                    seq += 1
                    ready = {"v": 10, "user": self.bot_user, "guilds": [], "session_id": "fake-session",
                             "resume_gateway_url": self.gateway_url, "shard": [0, 1],
                             "application": {"id": str(self.application_id), "flags": 1 << 19}}
                    await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": seq, "d": ready}))
                    await self.changed()
        finally:
            self._sockets.remove(ws)
        return ws
