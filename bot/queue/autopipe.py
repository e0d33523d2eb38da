"""Auto-pipelining of Lua script calls: every call made in one event-loop tick shares a round trip.

A worker that reads 32 entries at once begins 32 jobs in the same tick, and jobs that finish
together finish in the same tick; an adapter acking a burst of mentions enqueues them together.
Sent one by one, each call pays redis-py's whole per-command path (pool checkout, a send, a
wakeup, a parse, a release); here the calls of a tick go out as one pipeline (not a transaction:
each script is atomic on its own, and they touch different conversations). A lone call waits
for nothing: the batch is sent at the end of the tick that made it.

Scripts run by SHA. Redis forgets its scripts when it restarts (they are not in the AOF), so a
NOSCRIPT reply loads the script and sends that call again. Connection errors are retried by the
client's retry policy (``bot.queue.redis_conn``), like any other command.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError


@dataclass(frozen=True)
class LuaScript:
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


@dataclass
class _Call:
    script: LuaScript
    keys: list[Any]
    args: list[Any]
    future: asyncio.Future[Any]


class AutoPipeline:
    """``await autopipe.run(script, keys, args)``: the script's reply, sent in a shared pipeline."""

    #: calls per pipeline at most (a bigger tick is split; keeps one reply's memory bounded)
    MAX_BATCH = 256

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._batch: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: round trips made and calls sent (benchmarks report calls per round trip)
        self.round_trips = 0
        self.calls = 0

    async def run(self, script: LuaScript, keys: list[Any], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        if not self._batch:
            loop.call_soon(self._flush)
        self._batch.append(call)
        return await call.future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        for start in range(0, len(batch), self.MAX_BATCH):
            task = asyncio.get_running_loop().create_task(self._send(batch[start:start + self.MAX_BATCH]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            replies = await self._execute(calls)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # Redis restarted since we last loaded: load and send those calls again
                for script in {calls[i].script for i in missing}:
                    await self.redis.script_load(script.source)
                again = await self._execute([calls[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException as exc:  # the connection failed for good: every caller hears it
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():
                continue  # its caller was cancelled
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        self.round_trips += 1
        self.calls += len(calls)
        if len(calls) == 1:  # a lone call: a plain command is cheaper than a pipeline of one
            call = calls[0]
            try:
                return [await self.redis.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)]
            except ResponseError as exc:  # the script's own error (or NOSCRIPT): this call's reply
                return [exc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))
