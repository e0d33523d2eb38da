"""A scripted model server speaking the TGI / OpenAI chat-completions API over real HTTP.

Stands in for a GPU model server in tests. Replies come from a script:
  * a list of strings, served in order (the last one repeats), or
  * a function ``(messages) -> str`` for replies that depend on the conversation.
A streamed request that asks for ``stream_options.include_usage`` gets a last chunk with
``usage`` (prompt tokens: whitespace-separated words plus 3 per message; completion tokens: the
chunks sent), like TGI and vLLM; each is recorded in ``usage`` (``report_usage=False``: a server that
never sends it). It can also answer ``fail_times`` requests with ``fail_status`` (429/503) first, every
``fail_every``-th request with 429 and 503 in turn (an overloaded server, for benchmarks), or stall.

By default it behaves like TGI: ``/info`` names its model and any model name is accepted. With
``served_model`` set it behaves like vLLM (and other OpenAI-compatible servers that serve models by
name): no ``/info``, ``/v1/models`` lists exactly that name, and a chat request naming any other
model is answered 404 with vLLM's error body.

Run standalone (for the compose smoke test):
    python -m tests.fakes.model_server --port 8080 --script replies.json
where replies.json is a JSON list of reply strings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Script = list[str] | Callable[[list[dict[str, Any]]], str]


@dataclass
class ScriptedModelServer:
    script: Script = field(default_factory=lambda: ["Hello!"])
    chunk_chars: int = 7
    chunk_delay_s: float = 0.0
    fail_times: int = 0
    fail_status: int = 429
    fail_every: int = 0
    stall_s: float = 0.0
    #: vLLM-like: serve exactly this model name (None: TGI-like, any name goes)
    served_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: send ``usage`` in the stream's last chunk when the request asks for it
    report_usage: bool = True
    #: the usage each streamed reply reported, in order
    usage: list[dict[str, int]] = field(default_factory=list)
    #: the Authorization header of each chat request (None when absent)
    authorization: list[str | None] = field(default_factory=list)
    _served: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def next_reply(self, messages: list[dict[str, Any]]) -> str:
        if callable(self.script):
            return self.script(messages)
        reply = self.script[min(self._served, len(self.script) - 1)]
        self._served += 1
        return reply

    async def start(self) -> ScriptedModelServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _info(self, _: web.Request) -> web.Response:
        if self.served_model is not None:
            return web.json_response({"detail": "Not Found"}, status=404)  # vLLM has no /info
        return web.json_response({"model_id": "scripted", "max_total_tokens": 16384,
                                  "router": "text-generation-router", "version": "3.3.4"})

    async def _models(self, _: web.Request) -> web.Response:
        name = self.served_model or "scripted"
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model",
                                                              "owned_by": "vllm", "root": name}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.authorization.append(request.headers.get("Authorization"))
        if self.served_model is not None and body.get("model") != self.served_model:
            return web.json_response({"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                                      "type": "NotFoundError", "param": None, "code": 404}, status=404)
        if self.fail_times > 0:
            self.fail_times -= 1
            return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"},
                                     status=self.fail_status)
        if self.fail_every and len(self.requests) % self.fail_every == 0:
            status = 429 if len(self.requests) // self.fail_every % 2 else 503
            return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"}, status=status)
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        reply = self.next_reply(body["messages"])
        for stop in body.get("stop") or []:
            reply = reply.split(stop)[0]
        created = int(time.time())
        rid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if not body.get("stream"):
            return web.json_response({
                "id": rid, "object": "chat.completion", "created": created, "model": "scripted",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pieces = [reply[i:i + self.chunk_chars] for i in range(0, len(reply), self.chunk_chars)]
        for piece in pieces:
            await resp.write(self._sse(rid, created, {"role": "assistant", "content": piece}, None))
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await resp.write(self._sse(rid, created, {}, "stop"))
        if self.report_usage and (body.get("stream_options") or {}).get("include_usage"):
            prompt = sum(len(str(m.get("content", "")).split()) + 3 for m in body["messages"])
            usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                     "total_tokens": prompt + len(pieces)}
            self.usage.append(usage)
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": "scripted",
                     "system_fingerprint": "scripted", "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    def _sse(rid: str, created: int, delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": "scripted",
                 "system_fingerprint": "scripted",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--script", help="JSON file with a list of reply strings")
    parser.add_argument("--fail-every", type=int, default=0, help="answer every Nth request with 429/503")
    parser.add_argument("--served-model", help="serve only this model name, like vLLM (default: any, like TGI)")
    args = parser.parse_args()
    replies = json.load(open(args.script)) if args.script else ["Hello from the scripted model."]

    async def serve() -> None:
        server = await ScriptedModelServer(script=replies, host=args.host, port=args.port,
                                           fail_every=args.fail_every, served_model=args.served_model).start()
        print(f"scripted model server on {server.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
