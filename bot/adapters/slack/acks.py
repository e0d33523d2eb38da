"""Acks first: work that follows an ack waits while other acks are still being answered.

Everything the adapter does after acking an event (the status message, the conversation's
records, ephemeral notices, streamed edits) runs on the same event loop as the acks. Under a
burst of events, those calls would take turns with the requests still waiting for their ack, and
every ack of the burst would pay for them: measured with ``codeloop bench ack``, post-ack work was
over half of the adapter's CPU during a burst of 100 events. So post-ack work first awaits
``AckFirst.quiet()``: it returns at once when no events request is being handled, and otherwise
when the last one has been answered, or after ``max_wait_s`` at most, so steady traffic delays a
status message by a fraction of a second and never starves it.

Only the order changes: each ack still follows its job's enqueue (the at-least-once contract in
docs/SLACK.md), and nothing after the ack is skipped. In Socket Mode no HTTP request passes the
events endpoint, so ``quiet()`` never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

MAX_WAIT_S = 0.25


class AckFirst:
    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self._in_flight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Around the handling of one events request. aiohttp writes the response in the same
        step as the handler returns, so a waiter woken by the last one runs after its ack is out."""
        self._in_flight += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._quiet.set()

    async def quiet(self) -> None:
        """Return when no ack is pending (at once if none is), or after ``max_wait_s``."""
        if self._quiet.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), self.max_wait_s)
