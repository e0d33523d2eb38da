"""Real Docker, real sandbox image, no mocks. Every container a test creates is removed after it.

The image must already be built (`codeloop sandbox build`, done by .ci/run); a missing engine or
image fails the run loudly instead of skipping, because CI always has both.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import docker
import pytest

from runner.config import SandboxConfig
from runner.manager import SandboxManager
from runner.session import SandboxSession

#: CODELOOP_TEST_SANDBOX_IMAGE lets a branch test its own build of the image beside main's
IMAGE = os.environ.get("CODELOOP_TEST_SANDBOX_IMAGE", "codeloop-sandbox:latest")
TEST_LABEL = "codeloop.test"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        pytest.fail(f"Docker engine unreachable ({exc}); `bash .ci/run` starts dockerd")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"sandbox image {IMAGE} missing: run `codeloop sandbox build --base codeloop/base:bookworm`"
        )
    yield client
    client.close()


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def make_config(run_id: str) -> Callable[..., SandboxConfig]:
    """Small, fast limits for tests; every container is labelled with this test's run id."""

    def factory(**overrides: Any) -> SandboxConfig:
        values: dict[str, Any] = {
            "image": IMAGE,
            "cell_timeout_s": 2.0,
            "memory": "256m",
            "tmp_size": "16m",
            "data_size": "16m",
            "pool_size": 0,
            "idle_ttl_s": 300.0,
            "output_chars": 2000,
            "max_files": 20,
            "max_file_bytes": 1024 * 1024,
            "labels": {TEST_LABEL: run_id},
        }
        values.update(overrides)
        return SandboxConfig(**values)

    return factory


@pytest.fixture
async def make_manager(
    docker_client: docker.DockerClient, make_config: Callable[..., SandboxConfig], run_id: str
) -> AsyncIterator[Callable[..., Awaitable[SandboxManager]]]:
    managers: list[SandboxManager] = []

    async def factory(**overrides: Any) -> SandboxManager:
        manager = SandboxManager(make_config(**overrides), docker_client)
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in managers:
        await manager.aclose()
    leftovers = await asyncio.to_thread(
        docker_client.containers.list, all=True, filters={"label": f"{TEST_LABEL}={run_id}"}, sparse=True
    )  # sparse: no inspect per container, which races with auto-removal (404)
    for container in leftovers:
        try:
            await asyncio.to_thread(container.remove, force=True)
        except docker.errors.APIError:
            pass  # already being auto-removed


@pytest.fixture
async def manager(make_manager: Callable[..., Awaitable[SandboxManager]]) -> SandboxManager:
    return await make_manager()


@pytest.fixture
async def session(manager: SandboxManager) -> SandboxSession:
    sess, note = await manager.acquire(None, "test")
    assert note is None
    return sess
