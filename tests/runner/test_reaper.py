"""Host-side reaping: the janitor removes what no executor ends by itself, acquire() never hands
back a silent session, and a thread's lost session is removed before it gets a new one."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from bot.core.settings import Settings
from bot.worker.sandbox_link import ThreadSandbox
from bot.worker.store import ConversationState
from runner.config import SandboxConfig, container_spec
from runner.janitor import ReapPolicy, stamped_name
from runner.manager import SandboxManager
from runner.session import MALFORMED
from tests.runner.conftest import IMAGE, TEST_LABEL
from tests.runner.helpers import run_ok
from tests.runner.test_host_trust import exists, start_fake

MakeManager = Callable[..., Awaitable[SandboxManager]]
FAST = ReapPolicy(interval_s=0.5, ping_timeout_s=1.0)
NEVER = ReapPolicy(interval_s=3600.0, ping_timeout_s=1.0)  # no pass in a test; its ping timeout bounds acquire


@pytest.fixture
async def make_reaping(
    make_manager: MakeManager, docker_client: docker.DockerClient, make_config: Callable[..., SandboxConfig]
) -> AsyncIterator[Callable[..., Awaitable[SandboxManager]]]:
    """Managers with a janitor (make_manager's teardown removes what the test labelled)."""
    managers: list[SandboxManager] = []

    async def factory(reap: ReapPolicy = FAST, **overrides: Any) -> SandboxManager:
        manager = SandboxManager(make_config(**overrides), docker_client, reap=reap)
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in managers:
        await manager.aclose()


def freeze(client: docker.DockerClient, cid: str, how: str) -> None:
    """Freeze a sandbox from the host, as a cell that SIGSTOPs its executor would (every process, so
    it holds whichever of them is the executor), or with the engine's freezer."""
    container = client.containers.get(cid)
    if how == "pause":
        container.pause()
        return
    top = container.top()
    column = top["Titles"].index("PID")
    for row in top["Processes"]:
        os.kill(int(row[column]), signal.SIGSTOP)


async def wait_gone(client: docker.DockerClient, cid: str, limit_s: float) -> float:
    started = time.monotonic()
    while await asyncio.to_thread(exists, client, cid):
        assert time.monotonic() - started < limit_s, f"sandbox {cid[:12]} still there after {limit_s:g} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def lifecycle(client: docker.DockerClient, run_id: str, since: float) -> list[tuple[str, str]]:
    """(action, container id) of the run's create/destroy events since ``since``, in order."""
    events = client.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                           filters={"type": "container", "label": f"{TEST_LABEL}={run_id}"})
    return [(e["Action"], e["id"]) for e in events if e.get("Action") in ("create", "destroy")]


def removed_before_created(events: list[tuple[str, str]], old: str, new: str) -> bool:
    return events.index(("destroy", old)) < events.index(("create", new))


@pytest.mark.parametrize("how", ["sigstop", "pause"])
async def test_a_frozen_executor_is_removed_by_the_host(
    make_reaping: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture, how: str,
) -> None:
    caplog.set_level(logging.INFO, logger="runner")
    ttl = 16.0
    manager = await make_reaping(idle_ttl_s=ttl)
    other = await make_reaping(idle_ttl_s=ttl)  # a second worker's janitor sweeps the same sandboxes
    session, _ = await manager.acquire(None, "frozen")
    await run_ok(session, "x = 1")
    await asyncio.to_thread(freeze, docker_client, session.id, how)
    took = await wait_gone(docker_client, session.id, ttl + 60)
    print(f"frozen ({how}) sandbox removed {took:.1f} s after it was frozen (idle TTL {ttl:g} s)")
    why = "paused" if how == "pause" else "no answer to a ping"
    assert any(session.id[:12] in r.getMessage() and why in r.getMessage() for r in caplog.records)
    passes = [m.janitor.passes for m in (manager, other) if m.janitor is not None]
    while any(m.janitor is not None and m.janitor.passes < seen + 2 for m, seen in zip((manager, other), passes,
                                                                                        strict=True)):
        await asyncio.sleep(0.2)  # both janitors keep going after the removal
    fresh, note = await manager.acquire(session.id, "frozen")
    assert fresh.id != session.id and note is not None and "stopped unexpectedly" in note
    await run_ok(fresh, "1")


async def test_acquire_never_hands_back_a_silent_session(
    make_reaping: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient, run_id: str,
) -> None:
    worker_a = await make_reaping(reap=NEVER)
    worker_b = await make_reaping(reap=NEVER)
    since = time.time()
    for taker in (worker_a, worker_b):  # attached here already / reattached from another worker
        session, _ = await worker_a.acquire(None, "thread")
        await run_ok(session, "x = 1")
        await asyncio.to_thread(freeze, docker_client, session.id, "sigstop")
        fresh, note = await taker.acquire(session.id, "thread")
        assert fresh.id != session.id and note is not None and "stopped unexpectedly" in note
        assert not await asyncio.to_thread(exists, docker_client, session.id)
        events = await asyncio.to_thread(lifecycle, docker_client, run_id, since)
        assert removed_before_created(events, session.id, fresh.id), events
        await run_ok(fresh, "1")


async def test_a_lost_session_is_removed_before_the_thread_gets_a_new_one(
    make_reaping: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient, run_id: str,
    make_settings: Callable[..., Settings],
) -> None:
    """The worker's path: a cell's reply is malformed, the model is told, the container is removed,
    and only then is the thread's next session made."""
    manager = await make_reaping(reap=NEVER)
    since = time.time()
    liar = await start_fake(docker_client.api, manager.config, "not_png")
    await liar.detach()
    state = ConversationState(session_id=liar.id)
    thread = ThreadSandbox(manager, state, "slack:T:C:1.0", make_settings())
    result, _ = await thread.run("print('hi')")
    assert result.error is not None and result.error.name == "SessionLost" and result.error.value == MALFORMED
    assert not await asyncio.to_thread(exists, docker_client, liar.id)
    again, notes = await thread.run("1 + 1")
    assert again.results[0].text == "2" and any("stopped unexpectedly" in n for n in notes)
    assert state.session_id not in (None, liar.id)
    events = await asyncio.to_thread(lifecycle, docker_client, run_id, since)
    assert removed_before_created(events, liar.id, str(state.session_id)), events


async def test_a_live_executor_that_never_exits_is_removed_after_the_idle_ttl(
    make_reaping: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It answers every ping (a cell took over the executor) but its thread stopped using it."""
    caplog.set_level(logging.INFO, logger="runner")
    ttl = 4.0
    manager = await make_reaping(idle_ttl_s=ttl)
    squatter = await start_fake(docker_client.api, manager.config, "silent")
    await squatter.detach()
    claimed = await asyncio.to_thread(
        docker_client.api.create_container_from_config,
        {**container_spec(docker_client.api, manager.config, "hostile"),
         "Cmd": ["python", "-u", "-c", Path(__file__).with_name("hostile_supervisor.py").read_text(), "silent"]},
        stamped_name("slack:T:C:2.0", time.time()),
    )
    await asyncio.to_thread(docker_client.api.start, claimed["Id"])
    for cid in (squatter.id, claimed["Id"]):
        took = await wait_gone(docker_client, cid, ttl + 60)
        print(f"a live executor past its idle TTL ({ttl:g} s) removed within {took:.1f} s more")
        assert any(cid[:12] in r.getMessage() and "idle for" in r.getMessage() for r in caplog.records)


async def test_a_session_in_use_is_never_reaped_by_another_workers_janitor(
    make_manager: MakeManager, make_reaping: Callable[..., Awaitable[SandboxManager]],
    docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture,
) -> None:
    """The idle record is the stamp the using worker writes into the container's name: a janitor
    that never attached to the session reads it."""
    caplog.set_level(logging.INFO, logger="runner")
    ttl = 5.0
    user = await make_manager(idle_ttl_s=ttl)
    janitor_host = await make_reaping(idle_ttl_s=ttl, reap=ReapPolicy(interval_s=0.3, ping_timeout_s=2.0))
    assert janitor_host.janitor is not None
    session, _ = await user.acquire(None, "slack:T:C:3.0")
    await run_ok(session, "n = 0")
    started = time.monotonic()
    passes = janitor_host.janitor.passes
    while janitor_host.janitor.passes < passes + 15 or time.monotonic() - started < 3 * ttl:
        await run_ok(session, "n += 1")
        await asyncio.sleep(0.3)
    assert (await run_ok(session, "n > 5")).results[0].text == "True"
    took = await wait_gone(docker_client, session.id, ttl + 60)
    print(f"unused for the idle TTL ({ttl:g} s): removed by another worker's janitor {took:.1f} s after its last use")
    assert any(session.id[:12] in r.getMessage() and "idle for" in r.getMessage() for r in caplog.records)


async def test_a_sandbox_that_never_started_is_removed(
    make_reaping: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient,
) -> None:
    manager = await make_reaping(start_timeout_s=1.0)
    spec = container_spec(docker_client.api, manager.config, "crashed-before-start")
    created = await asyncio.to_thread(docker_client.api.create_container_from_config, spec, None)
    await wait_gone(docker_client, created["Id"], 60)


async def test_codeloop_sandbox_reap_is_one_pass_of_the_janitor(
    make_manager: MakeManager, docker_client: docker.DockerClient, run_id: str,
) -> None:
    manager = await make_manager()
    frozen, _ = await manager.acquire(None, "frozen")
    busy, _ = await manager.acquire(None, "in-use")
    await run_ok(busy, "x = 1")
    await asyncio.to_thread(freeze, docker_client, frozen.id, "pause")
    env = {**os.environ, "CODELOOP_SANDBOX_LABELS": f"{TEST_LABEL}={run_id}", "CODELOOP_SANDBOX_IMAGE": IMAGE,
           "CODELOOP_SANDBOX_PING_TIMEOUT_S": "1"}
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot.cli", "sandbox", "reap"], capture_output=True, text=True,
        timeout=120, env=env, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    assert f"removed {frozen.id[:12]}: paused, 2 times in a row" in proc.stdout
    assert "removed 1 sandbox container(s)" in proc.stdout
    assert not await asyncio.to_thread(exists, docker_client, frozen.id)
    assert (await run_ok(busy, "x")).results[0].text == "1"  # in use: untouched
