"""Fixtures for the fault suite: a Redis of our own to restart, and a worker without sandboxes."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bot.bench.queue import NoSandbox
from bot.core.settings import Settings
from bot.worker.service import Worker
from tests.conftest import RunningWorkers


class RedisServer:
    """A ``redis-server`` on a free loopback port with AOF on (``appendfsync everysec``, as in
    production), its data in a test directory so that a restart reads the same AOF back."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
            time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis closes every client, fsyncs the AOF and exits (what `docker stop` does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def text_worker(model_server: Any) -> AsyncIterator[Callable[[Settings], Any]]:
    """``await text_worker(settings) -> Worker``: a real worker on the scripted model server with
    no sandbox (the replies carry no code, so none is needed; one asked for fails the test)."""
    workers = RunningWorkers()

    async def factory(settings: Settings) -> Worker:
        return await workers.start(Worker(settings, sandboxes=NoSandbox()), within_s=30)  # type: ignore[arg-type]

    yield factory
    await workers.stop()
