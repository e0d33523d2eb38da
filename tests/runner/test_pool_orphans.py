"""A worker killed with a warm pool leaves no container behind for long; a live one keeps its pool."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import docker

from runner.manager import SandboxManager
from tests.runner.conftest import IMAGE, TEST_LABEL

HOLDER = """
import asyncio, sys
from runner.config import SandboxConfig
from runner.manager import SandboxManager

async def main():
    manager = SandboxManager(SandboxConfig(image=sys.argv[1], pool_size=2, pool_claim_ttl_s=1.5,
                                           labels={sys.argv[2]: sys.argv[3]}))
    await manager.start()
    await manager.wait_pool()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def labelled(client: docker.DockerClient, run_id: str) -> list[str]:
    # one list call: containers.list() inspects each container after listing, and one removed in
    # between (what this test waits for) raised NotFound
    return [c["Id"] for c in client.api.containers(all=True, filters={"label": f"{TEST_LABEL}={run_id}"})]


async def test_a_killed_workers_pool_exits_by_itself(docker_client: docker.DockerClient, run_id: str) -> None:
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, IMAGE, TEST_LABEL, run_id,
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        assert line.startswith(b"ready")
        assert len(await asyncio.to_thread(labelled, docker_client, run_id)) == 2
    finally:
        holder.kill()  # SIGKILL: no aclose(), nobody removes the pool
        await holder.wait()
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(labelled, docker_client, run_id):
        assert time.monotonic() < deadline, "the dead worker's pool containers are still there after 30 s"
        await asyncio.sleep(0.25)


async def test_a_live_worker_keeps_its_pool_past_the_claim_ttl(
        make_manager: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient,
        run_id: str) -> None:
    manager = await make_manager(pool_size=2, pool_claim_ttl_s=1.0)
    await manager.wait_pool()
    before = sorted(await asyncio.to_thread(labelled, docker_client, run_id))
    await asyncio.sleep(3.0)  # three claim TTLs: pings keep them
    assert sorted(await asyncio.to_thread(labelled, docker_client, run_id)) == before
    assert manager.pool_ready == 2
    session, _ = await manager.acquire(None, "thread")  # a claimed one outlives the claim TTL unpinged
    await session.run("x = 41")
    await asyncio.sleep(2.0)
    assert (await session.run("print(x + 1)")).stdout.strip() == "42"
