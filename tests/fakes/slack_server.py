"""The fake Slack Web API as Slack's servers also behave towards an operator's checks, and standalone.

``ScopedSlackAPI`` adds to ``FakeSlackAPI`` what ``codeloop doctor`` reads: the ``x-oauth-scopes``
header Slack puts on every Web API answer (the token's granted scopes), and revoked tokens
(``token_revoked``). Run as a program it serves on a fixed address, for the compose smoke test,
with two read-only routes for the test to look at what the bot did:

    python -m tests.fakes.slack_server --port 8090 --token xoxb-smoke
    GET /_fake/messages   the bot's messages, as they read now (after edits)
    GET /_fake/calls      every Web API call's method name, in order
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aiohttp import web

from tests.fakes.http_recorder import MAX_BODY
from tests.fakes.slack_api import FakeSlackAPI

#: what deploy/slack-manifest.yml grants the bot
MANIFEST_SCOPES = ("app_mentions:read", "chat:write", "reactions:write", "files:read", "files:write",
                   "channels:history", "groups:history", "im:history", "commands", "users:read")


class ScopedSlackAPI(FakeSlackAPI):
    def __init__(self, *args: Any, scopes: tuple[str, ...] = MANIFEST_SCOPES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scopes = list(scopes)
        self.revoked: set[str] = set()

    async def _api(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") in self.revoked:
            await self._record(request.match_info["method"] + ":revoked", {})
            return web.json_response({"ok": False, "error": "token_revoked"})
        response = await super()._api(request)
        response.headers["x-oauth-scopes"] = ",".join(self.scopes)
        return response

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_get("/_fake/messages", self._fake_messages)
        app.router.add_get("/_fake/calls", self._fake_calls)

    async def _fake_messages(self, _: web.Request) -> web.Response:
        messages = [{"channel": ch, **m} for (ch, _), m in self.messages.items()]
        return web.json_response(messages)

    async def _fake_calls(self, _: web.Request) -> web.Response:
        return web.json_response([c.method for c in self.calls])

    async def serve(self, host: str, port: int) -> None:
        """Listen on a fixed address (``start`` takes a free port)."""
        app = web.Application(client_max_size=MAX_BODY)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.base = f"http://{host}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="xoxb-test-token", help="the bot token it accepts")
    args = parser.parse_args()

    async def run() -> None:
        fake = ScopedSlackAPI(token=args.token)
        await fake.serve(args.host, args.port)
        print(f"fake Slack Web API on {fake.api_url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
