"""The manager: start checks, warm pool, reattach from another process, idle reaping, loss, destroy."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable

import docker
import pytest

from bot.core.errors import SandboxUnavailable, SessionLost
from runner.config import SandboxConfig
from runner.hardening import security_opt
from runner.manager import SandboxManager
from tests.runner.conftest import IMAGE, TEST_LABEL
from tests.runner.helpers import run_ok

MakeManager = Callable[..., Awaitable[SandboxManager]]


def containers(client: docker.DockerClient, run_id: str) -> list[str]:
    # sparse: no inspect per container, which races with auto-removal (NotFound)
    found = client.containers.list(all=True, sparse=True, filters={"label": f"{TEST_LABEL}={run_id}"})
    return sorted(c.id for c in found)


async def test_start_fails_with_fix_when_image_missing(docker_client: docker.DockerClient) -> None:
    manager = SandboxManager(SandboxConfig(image="codeloop-sandbox:does-not-exist"), docker_client)
    with pytest.raises(SandboxUnavailable, match="codeloop sandbox build"):
        await manager.start()


async def test_warm_pool(
    make_manager: MakeManager, docker_client: docker.DockerClient, run_id: str
) -> None:
    manager = await make_manager(pool_size=2)
    deadline = time.monotonic() + 30
    while len(containers(docker_client, run_id)) < 2 or manager.pool_ready < 2:
        assert time.monotonic() < deadline, "pool did not fill"
        await asyncio.sleep(0.1)
    pooled = {s.id for s in manager._pool}
    started = time.perf_counter()
    first, note = await manager.acquire(None, "slack:T1:C1:1.0")
    took = time.perf_counter() - started
    assert note is None and first.id in pooled and took < 0.05
    second, _ = await manager.acquire(None, "slack:T1:C1:2.0")
    assert second.id in pooled and second.id != first.id
    await run_ok(first, "secret = 1")
    assert (await second.run("secret")).error is not None  # never shared across threads
    # The pool refills in the background with new containers, never the ones handed out.
    while manager.pool_ready < 2:
        assert time.monotonic() < deadline, "pool did not refill"
        await asyncio.sleep(0.1)
    assert not {s.id for s in manager._pool} & {first.id, second.id}
    await manager.destroy(first.id)
    third, _ = await manager.acquire(None, "slack:T1:C1:3.0")
    assert third.id != first.id
    # aclose removes unused pool containers but leaves live sessions for other workers.
    await manager.aclose()
    await asyncio.sleep(0.5)
    left = containers(docker_client, run_id)
    assert left == sorted([second.id, third.id])


REATTACH_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from runner.config import SandboxConfig
    from runner.manager import SandboxManager

    async def main():
        manager = SandboxManager(SandboxConfig(image="{image}", labels={{"{label}": "{run_id}"}}, pool_size=0))
        await manager.start()
        session, _ = await manager.acquire(None, "worker-a")
        result = await session.run("answer = 42\\nopen('notes.txt', 'w').write('kept')")
        assert result.error is None, result.error
        print(session.id, flush=True)
        os._exit(0)  # the worker dies without cleaning up

    asyncio.run(main())
""")


async def test_reattach_from_another_process(make_manager: MakeManager, run_id: str) -> None:
    script = REATTACH_SCRIPT.format(image=IMAGE, label=TEST_LABEL, run_id=run_id)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    session_id = proc.stdout.strip()
    manager = await make_manager()
    session, note = await manager.acquire(session_id, "worker-b")
    assert note is None and session.id == session_id
    result = await run_ok(session, "answer, open('notes.txt').read()")
    assert result.results[0].text == "(42, 'kept')"


async def test_idle_session_is_reaped(make_manager: MakeManager, docker_client: docker.DockerClient) -> None:
    manager = await make_manager(idle_ttl_s=1.5)
    session, _ = await manager.acquire(None, "idle")
    await run_ok(session, "x = 1")
    old_id = session.id
    await manager.aclose()  # every worker gone: only the executor's own TTL can reap it
    deadline = time.monotonic() + 20
    while True:
        try:
            docker_client.containers.get(old_id)
        except docker.errors.NotFound:
            break
        assert time.monotonic() < deadline, "idle sandbox was not reaped"
        await asyncio.sleep(0.2)
    other = await make_manager(idle_ttl_s=1.5)
    fresh, note = await other.acquire(old_id, "idle")
    assert fresh.id != old_id
    assert note == "The previous Python session expired after 1.5 seconds idle."
    assert (await fresh.run("x")).error is not None


async def test_activity_keeps_session_alive(make_manager: MakeManager) -> None:
    manager = await make_manager(idle_ttl_s=1.5)
    session, _ = await manager.acquire(None, "busy")
    await run_ok(session, "x = 1")
    for _ in range(4):
        await asyncio.sleep(0.6)
        await run_ok(session, "x += 1")
    assert (await run_ok(session, "x")).results[0].text == "5"


async def test_killed_executor_loses_session(make_manager: MakeManager, docker_client: docker.DockerClient) -> None:
    manager = await make_manager()
    session, _ = await manager.acquire(None, "doomed")
    # A cell cannot kill the executor (PID 1, tests/runner/test_hostile.py); the engine can.
    running = asyncio.create_task(session.run("import time\ntime.sleep(30)", timeout=60))
    await asyncio.to_thread(docker_client.api.kill, session.id, "SIGKILL")
    with pytest.raises(SessionLost):
        await running
    fresh, note = await manager.acquire(session.id, "doomed")
    assert fresh.id != session.id
    assert note is not None and "stopped unexpectedly" in note
    assert (await run_ok(fresh, "1")).results[0].text == "1"


async def test_destroy_is_idempotent(manager: SandboxManager, docker_client: docker.DockerClient) -> None:
    session, _ = await manager.acquire(None, "reset")
    await manager.destroy(session.id)
    await manager.destroy(session.id)
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(session.id)
    with pytest.raises(SessionLost):
        await session.run("1")
    fresh, note = await manager.acquire(session.id, "reset")
    assert fresh.id != session.id and note is not None


async def test_container_hardening(manager: SandboxManager, docker_client: docker.DockerClient) -> None:
    session, _ = await manager.acquire(None, "inspect")
    attrs = docker_client.containers.get(session.id).attrs
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == security_opt()
    assert host["PidsLimit"] == 128 and host["Memory"] == host["MemorySwap"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 10**9 and not host["Init"] and host["AutoRemove"] is True  # the supervisor is PID 1
    assert host["Binds"] in (None, []) and host["LogConfig"]["Type"] == "none"
    assert {u["Name"] for u in host["Ulimits"]} == {"nofile", "fsize"}
    assert set(host["Tmpfs"]) == {"/tmp", "/mnt/data"}
    uid, gid = attrs["Config"]["User"].split(":")  # the session's own, drawn for this container
    assert uid == gid and 2**20 <= int(uid) < 2**31 - 1
    assert all(f"uid={uid},gid={gid}" in opts for opts in host["Tmpfs"].values())
    assert attrs["Config"]["Labels"]["codeloop.session"] == "1"
    assert attrs["Config"]["Labels"]["codeloop.label"] == "inspect"
