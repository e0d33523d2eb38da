"""What the fake platform APIs (``discord_api.py``, ``slack_api.py``) share: a real aiohttp server on
a free loopback port, the calls it records, and waiting until they satisfy a test.

A fake subclasses ``HTTPRecorder``, adds its routes in ``routes(app)``, appends to ``calls`` as
requests come in, and calls ``changed()`` once a request has been handled, which wakes every
``wait_for`` to check its predicate again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Generic, Self, TypeVar

from aiohttp import web

C = TypeVar("C")

MAX_BODY = 64 * 1024 * 1024  # uploads in tests are large on purpose


class HTTPRecorder(Generic[C]):
    def __init__(self) -> None:
        self.calls: list[C] = []
        self.base = ""  # http://127.0.0.1:PORT once started
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def describe(self, call: C) -> object:
        """A call as a failed ``wait_for`` lists it."""
        return call

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> Self:
        app = web.Application(client_max_size=MAX_BODY)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        return self

    @property
    def test_host(self) -> str:
        """``127.0.0.1:PORT``: what ``CODELOOP_DOWNLOAD_TEST_HOSTS`` must list for a worker to
        download from this fake (no loopback exception exists in production code)."""
        return self.base.removeprefix("http://")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- for tests ------------------------------------------------------------------------------
    async def changed(self) -> None:
        """Wake the waiters: a request was recorded or handled."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], within: float = 15.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every call) and return its value."""
        async with self._changed:
            result = predicate()
            deadline = time.monotonic() + within
            while not result:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [self.describe(c) for c in self.calls]
                    raise AssertionError(f"nothing matched within {within} s; calls: {seen}")
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    pass
                result = predicate()
            return result
