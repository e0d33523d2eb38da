"""Shared fixtures: real Redis (per-test key prefix, cleaned after), settings factory.

Services are expected on loopback (``.ci/run`` starts them): Redis at CODELOOP_TEST_REDIS_URL
(default redis://127.0.0.1:6379/0) and the Docker engine at DOCKER_HOST (default socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis

from bot.core.settings import Settings

if TYPE_CHECKING:
    from bot.worker.service import Worker

REDIS_URL = os.environ.get("CODELOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


#: fixtures that reach a real service: a test using one (directly or through another) gets its
#: marker, so `-m "not docker"` and `-m "not redis"` select exactly; explicit marks still count
NEEDS = {
    "redis": {"redis_client", "start_worker", "text_worker", "redis_server", "own_redis"},
    "docker": {"docker_client", "eval_manager", "start_worker", "sandbox_image", "engine"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in NEEDS.items():
            if used & fixtures and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's CODELOOP_* variables, nor a ./.env settings file."""
    for name in list(os.environ):
        if name.startswith("CODELOOP_") and not name.startswith("CODELOOP_TEST_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CODELOOP_ENV_FILE", "")  # tests/deploy/test_settings_file.py sets its own


@pytest.fixture
def key_prefix() -> str:
    return f"cltest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(key_prefix: str) -> Callable[..., Settings]:
    """Settings for a test: its own Redis key prefix, fast reclaim, small pools."""

    def factory(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "redis_url": REDIS_URL,
            "key_prefix": key_prefix,
            "llm_backend": "tgi",
            "llm_url": "http://127.0.0.1:9",  # replaced by tests that talk to a model
            "sandbox_pool_size": 0,
            "llm_backoff_s": 0.01,
            "sandbox_image": os.environ.get("CODELOOP_TEST_SANDBOX_IMAGE", "codeloop-sandbox:latest"),
            # the per-thread file store (bot/worker/files_store.py): per test, never the developer's
            "files_dir": os.path.join(tempfile.gettempdir(), "codeloop-test-files", key_prefix),
        }
        base.update(overrides)
        return Settings.load(**base)

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def redis_client(key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, not a test failure mode
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); `bash .ci/run` starts it")
    yield client
    keys = [k async for k in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def sync_cleanup() -> Iterator[list[Callable[[], None]]]:
    """Register callables to run at teardown (e.g. container removal)."""
    callbacks: list[Callable[[], None]] = []
    yield callbacks
    for cb in reversed(callbacks):
        try:
            cb()
        except Exception:
            pass


# --- end-to-end: scripted model server, real worker, real sandboxes -------------------------

@pytest.fixture
async def model_server() -> AsyncIterator[Any]:
    """A scripted OpenAI/TGI chat server on loopback; set ``.script`` in the test."""
    from tests.fakes.model_server import ScriptedModelServer

    server = await ScriptedModelServer().start()
    yield server
    await server.stop()


def _remove_test_containers(key_prefix: str) -> None:
    import docker

    client = docker.from_env()
    for container in client.containers.list(all=True, filters={"label": f"codeloop.test={key_prefix}"}):
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass
    client.close()


class RunningWorkers:
    """The workers a test started: ``start`` runs one until it is ready, ``stop`` ends them all."""

    def __init__(self) -> None:
        self.started: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(self, worker: Worker, within_s: float) -> Worker:
        """Run ``worker`` in the background; its start-up error, if it fails, is raised here."""
        task = asyncio.create_task(worker.run())
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED, timeout=within_s)
        ready.cancel()
        if task.done():
            task.result()
        assert worker.ready.is_set(), f"worker did not become ready in {within_s:g} s"
        self.started.append((worker, task))
        return worker

    async def stop(self) -> None:
        started, self.started = self.started, []
        for worker, task in started:
            worker.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=30)


@pytest.fixture
async def start_worker(make_settings: Callable[..., Settings], model_server: Any,
                       key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """``await start_worker(**setting_overrides) -> Worker``: a real worker on the scripted model
    and real Docker sandboxes (labelled for this test and removed afterwards)."""
    from bot.worker.service import Worker
    from runner.config import SandboxConfig
    from runner.manager import SandboxManager

    workers = RunningWorkers()

    async def factory(**overrides: Any) -> Worker:
        overrides.setdefault("llm_url", model_server.url)
        overrides.setdefault("sandbox_cell_timeout_s", 10.0)
        settings = make_settings(**overrides)
        manager = SandboxManager(SandboxConfig.from_settings(settings, labels={"codeloop.test": key_prefix}))
        return await workers.start(Worker(settings, sandboxes=manager), within_s=60)

    yield factory
    await workers.stop()
    await asyncio.to_thread(_remove_test_containers, key_prefix)
