"""Several sandbox engines (runner/engines.py) against two real dockerd daemons on this machine.

The second daemon is started here: its own data-root, exec-root, socket and pidfile in a temp dir,
``--bridge=none`` (sandboxes have no network), the sandbox image loaded into it with
``docker save | docker load``; stopped and removed at teardown. Tests that stop it start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from bot.core.errors import ConfigError, SandboxUnavailable
from bot.core.settings import Settings
from bot.worker.sandbox_link import ThreadSandbox
from bot.worker.store import ConversationState
from runner.config import SESSION_LABEL, SandboxConfig
from runner.engines import EngineSet, EngineSpec, parse_engines
from runner.manager import SandboxManager
from tests.runner.conftest import IMAGE, TEST_LABEL

MAIN = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
START_LIMIT_S = 120.0  # a guard against a daemon that never comes up, not a timing assertion


class Daemon:
    """A second dockerd, own everything (network namespace included), no bridge and no iptables."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "d.sock"
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "dockerd.log", "ab")  # the daemon writes it until stopped
        self.proc = subprocess.Popen(
            # its own network namespace: a dockerd started with --bridge=none deletes the host's
            # docker0 at start, which would take the main engine's default network away
            ["unshare", "--net", "--", "dockerd", "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "x"),
             "-H", self.url, "--pidfile", str(self.root / "d.pid"), "--bridge=none", "--iptables=false",
             "--ip6tables=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_LIMIT_S
        while subprocess.run(["docker", "-H", self.url, "version"], capture_output=True).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("second dockerd did not start: " + (self.root / "dockerd.log").read_text()[-2000:])
            time.sleep(0.3)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM and wait: dockerd stops its containers and removes its socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def daemon(docker_client: docker.DockerClient) -> Iterator[Daemon]:
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.fail("these tests start a second dockerd: they need dockerd and root (CI has both)")
    root = Path(tempfile.mkdtemp(prefix="cle-", dir="/tmp"))  # short: the socket path has a limit
    second = Daemon(root)
    had_bridge = Path("/sys/class/net/docker0").exists()
    try:
        second.start()
        # the main engine keeps its default bridge (compose, later in CI, needs it)
        assert Path("/sys/class/net/docker0").exists() == had_bridge
        save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", second.url, "load", "-q"], stdin=save.stdout, check=True,
                       capture_output=True)
        assert save.wait() == 0
        yield second
    finally:
        if second.running:
            subprocess.run(f"docker -H {second.url} ps -aq | xargs -r docker -H {second.url} rm -f",
                           shell=True, capture_output=True)
        second.stop()
        subprocess.run(["sh", "-c", f"grep -o ' {root}[^ ]*' /proc/mounts | xargs -r -n1 umount -l"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def second(daemon: Daemon) -> Daemon:
    """The second daemon, running (a test before may have stopped it)."""
    if not daemon.running:
        daemon.start()
    return daemon


@pytest.fixture
async def make_set(
    make_config: Callable[..., SandboxConfig], second: Daemon, run_id: str
) -> AsyncIterator[Callable[..., Any]]:
    """EngineSets over "a" (the main engine) and "b" (the second daemon); containers removed after."""
    made: list[EngineSet] = []

    async def factory(order: str = "ab", a: str = "", b: str = "", start: bool = True,
                      **overrides: Any) -> EngineSet:
        urls = {"a": f"a={MAIN}{a}", "b": f"b={second.url}{b}"}
        specs = parse_engines([urls[n] for n in order], sessions=100, memory=None, tls_dir=None)
        engines = EngineSet(specs, make_config(**overrides), timeout_s=10.0, count_ttl_s=0.0, retry_s=2.0)
        made.append(engines)
        if start:
            await engines.start()
        return engines

    yield factory
    for engines in made:
        await engines.aclose()
    for url in (MAIN, second.url):
        if url == second.url and not second.running:
            continue
        client = docker.DockerClient(base_url=url, timeout=180)  # a busy machine removes slowly
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_id}"}):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)
        client.close()


def on(engines: EngineSet, name: str, run_id: str) -> int:
    """This test's sandboxes on an engine, as the engine lists them."""
    engine = next(e for e in engines.engines if e.name == name)
    found = engine.manager.api.containers(all=True, filters={"label": [f"{SESSION_LABEL}=1", f"{TEST_LABEL}={run_id}"]})
    return len(found)


# --- configuration -------------------------------------------------------------------------
def test_engine_list_parses_names_limits_and_tls(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    specs = parse_engines(
        ["a=unix:///run/a.sock", "b=tcp://engine-b.example.internal:2376?sessions=7&memory=2g",
         "c=tcp://engine-c.example.internal:2376"],
        sessions=50, memory="64g", tls_dir=str(tmp_path),
    )
    assert specs[0] == EngineSpec("a", "unix:///run/a.sock", 50, 64 << 30, None)
    assert specs[1] == EngineSpec("b", "tcp://engine-b.example.internal:2376", 7, 2 << 30, str(tmp_path / "b"))
    assert specs[2].tls_dir == str(tmp_path)  # no c/ folder: the shared material


@pytest.mark.parametrize("entry", [
    "unix:///run/a.sock",  # no name
    "A=unix:///run/a.sock",  # names are stored in threads: lowercase only
    "a/b=unix:///run/a.sock",  # the name separates the container id
    "a=http://host:2376",
    "a=tcp://host",  # no port
    "a=unix:///run/a.sock?sessions=0",
    "a=unix:///run/a.sock?cpus=4",
    "a=tcp://engine.example.internal:2376",  # off this host without TLS
])
def test_a_bad_engine_entry_is_refused_by_name(entry: str) -> None:
    with pytest.raises(ConfigError, match="CODELOOP_SANDBOX_ENGINES"):
        parse_engines([entry], sessions=10, memory=None, tls_dir=None)


def test_the_same_name_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_engines(["a=unix:///x", "a=unix:///y"], sessions=10, memory=None, tls_dir=None)


def test_settings_make_an_engine_set_only_when_engines_are_listed(make_settings: Callable[..., Settings]) -> None:
    from bot.worker.service import _make_sandboxes

    assert isinstance(_make_sandboxes(make_settings()), SandboxManager)  # zero config: DOCKER_HOST
    several = _make_sandboxes(make_settings(sandbox_engines="a=unix:///run/a.sock,b=tcp://127.0.0.1:2376",
                                            sandbox_engine_sessions=9, sandbox_engine_memory="4g"))
    assert isinstance(several, EngineSet)
    assert [(e.name, e.spec.max_sessions, e.spec.max_memory) for e in several.engines] == [
        ("a", 9, 4 << 30), ("b", 9, 4 << 30)]
    # the worker's warm pool is split over the engines, not repeated on each
    pools = _make_sandboxes(make_settings(sandbox_engines="a=unix:///a,b=unix:///b,c=unix:///c", sandbox_pool_size=4))
    assert isinstance(pools, EngineSet) and [e.manager.config.pool_size for e in pools.engines] == [2, 2, 2]


# --- two real daemons ----------------------------------------------------------------------
async def test_new_sessions_spread_over_both_engines(make_set: Callable[..., Any], run_id: str) -> None:
    engines: EngineSet = await make_set()
    refs = [(await engines.acquire(None, f"spread-{i}"))[0].ref for i in range(4)]
    assert sorted(r.split("/")[0] for r in refs) == ["a", "a", "b", "b"]
    assert on(engines, "a", run_id) == 2 and on(engines, "b", run_id) == 2


async def test_each_engine_keeps_its_share_of_the_warm_pool(make_set: Callable[..., Any], run_id: str) -> None:
    engines: EngineSet = await make_set(pool_size=2)  # one warm container on each engine
    await asyncio.wait_for(engines.wait_pool(), 120)  # a hang guard
    assert on(engines, "a", run_id) == 1 and on(engines, "b", run_id) == 1
    warm = {e.name: {c["Id"] for c in e.manager.api.containers(filters={"label": f"{TEST_LABEL}={run_id}"})}
            for e in engines.engines}
    taken = [(await engines.acquire(None, f"warm-{i}"))[0] for i in range(2)]
    assert sorted(s.ref.split("/")[0] for s in taken) == ["a", "b"]
    assert all(s.id in warm[s.ref.split("/")[0]] for s in taken)  # served from each engine's pool


async def test_placement_follows_free_capacity_and_memory(make_set: Callable[..., Any], run_id: str) -> None:
    # a: room for 2 sandboxes of 256m by memory; b: 3 sessions at most
    engines: EngineSet = await make_set(a="?memory=512m", b="?sessions=3")
    refs = [(await engines.acquire(None, f"cap-{i}"))[0].ref for i in range(5)]
    assert sorted(r.split("/")[0] for r in refs) == ["a", "a", "b", "b", "b"]
    with pytest.raises(SandboxUnavailable, match="limit"):
        await engines.acquire(None, "one-too-many")
    assert on(engines, "a", run_id) == 2 and on(engines, "b", run_id) == 3


async def test_sandbox_ls_and_clean_act_on_every_listed_engine(
    make_set: Callable[..., Any], second: Daemon, run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from runner import cli

    engines: EngineSet = await make_set()
    label = f"cli-{run_id}"
    sessions = [(await engines.acquire(None, label))[0] for _ in range(2)]
    assert sorted(s.ref.split("/")[0] for s in sessions) == ["a", "b"]
    monkeypatch.setenv("CODELOOP_SANDBOX_ENGINES", f"a={MAIN},b={second.url},gone=unix://{tmp_path}/none.sock")

    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        cli.configure(parser)
        rc = cli.main(parser.parse_args(list(argv)))
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, err = run("ls")
    rows = {line.split()[1]: line.split()[0] for line in out.splitlines()[1:]}
    assert rows[sessions[0].id[:12]] == sessions[0].ref[0] and rows[sessions[1].id[:12]] == sessions[1].ref[0]
    assert rc == 1 and "engine gone" in err  # named, skipped, and the exit status says so
    rc, out, err = run("clean", "--label", label)
    assert rc == 1 and out.strip() == "removed 2 sandbox container(s)"
    assert on(engines, "a", run_id) == on(engines, "b", run_id) == 0


async def test_another_worker_reattaches_on_the_session_s_engine(make_set: Callable[..., Any]) -> None:
    first: EngineSet = await make_set(order="ba")
    session, note = await first.acquire(None, "thread-1")
    assert session.ref.startswith("b/") and note is None
    await session.run("x = 41")
    other: EngineSet = await make_set(order="ab")  # another worker, its own clients, other order
    again, note = await other.acquire(session.ref, "thread-1")
    assert note is None and again.id == session.id and again.ref == session.ref
    assert (await again.run("print(x + 1)")).stdout.strip() == "42"


async def test_a_bare_session_id_from_before_resolves_to_the_first_engine(
    make_set: Callable[..., Any], make_config: Callable[..., SandboxConfig], docker_client: docker.DockerClient
) -> None:
    single = SandboxManager(make_config(), docker_client)  # a deployment with one engine
    await single.start()
    old, _ = await single.acquire(None, "old-thread")
    await old.run("y = 'kept'")
    await single.aclose()
    engines: EngineSet = await make_set()
    again, note = await engines.acquire(old.ref, "old-thread")
    assert note is None and again.id == old.id and again.ref == f"a/{old.id}"
    assert (await again.run("print(y)")).stdout.strip() == "kept"


async def test_stopping_an_engine_gives_its_threads_fresh_sessions_with_a_note(
    make_set: Callable[..., Any], make_settings: Callable[..., Settings], second: Daemon
) -> None:
    engines: EngineSet = await make_set(order="ba", cell_timeout_s=120.0)
    settings = make_settings()
    busy = ThreadSandbox(engines, ConversationState(), "busy-thread", settings)
    idle_state = ConversationState()
    idle = ThreadSandbox(engines, idle_state, "idle-thread", settings)
    await busy.run("x = 1")  # b (a tie goes to the first listed)
    await engines.acquire(None, "elsewhere")  # a
    await idle.run("z = 1")  # b again (a tie)
    assert busy.state.session_id and busy.state.session_id.startswith("b/")
    assert idle_state.session_id and idle_state.session_id.startswith("b/")

    # mid-cell: the daemon goes away under a running cell
    cell = asyncio.create_task(busy.run("import time\nfor _ in range(600): time.sleep(0.1)"))
    await asyncio.sleep(0.5)
    began = time.monotonic()
    stopping = asyncio.create_task(asyncio.to_thread(second.stop))
    result, _ = await asyncio.wait_for(cell, 120)  # a hang guard: the cell ends when its engine does
    lost_after = time.monotonic() - began
    assert result.error is not None and result.error.name == "SessionLost"
    await stopping
    result, notes = await asyncio.wait_for(busy.run("print('x' in globals())"), 120)
    print(f"\nengine stopped under a cell: SessionLost after {lost_after:.2f} s, the next cell ran on the "
          f"other engine {time.monotonic() - began:.2f} s after the stop began (dockerd exit included)")
    assert result.stdout.strip() == "False"
    assert any("unreachable" in n for n in notes)
    assert busy.state.session_id.startswith("a/")

    # between jobs, from another worker: the thread's engine is gone, it starts fresh elsewhere
    other: EngineSet = await make_set(order="ba", start=False)
    await other.start()  # starts with one engine of two answering
    link = ThreadSandbox(other, idle_state, "idle-thread", settings)
    result, notes = await asyncio.wait_for(link.run("print('z' in globals())"), 120)
    assert result.stdout.strip() == "False"
    assert any("unreachable" in n for n in notes)
    assert idle_state.session_id and idle_state.session_id.startswith("a/")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that takes connections and never answers: a host gone quiet mid-flight."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield server.getsockname()[1]
    server.close()


async def test_a_silent_engine_costs_a_bounded_wait_then_a_fresh_session(
    make_config: Callable[..., SandboxConfig], silent_port: int, docker_client: docker.DockerClient, run_id: str
) -> None:
    specs = parse_engines([f"quiet=tcp://127.0.0.1:{silent_port}", f"a={MAIN}"], 100, None, None)
    # retry_s=0: the quiet engine is tried again at once, so the thread's reattach meets the silence
    engines = EngineSet(specs, make_config(), timeout_s=1.0, count_ttl_s=0.0, retry_s=0.0)
    try:
        began = time.monotonic()
        await asyncio.wait_for(engines.start(), 60)  # a hang guard; the engine's own bound is 1 s
        started = time.monotonic() - began
        session, note = await asyncio.wait_for(engines.acquire("quiet/" + "0" * 64, "quiet-thread"), 60)
        print(f"\nsilent engine: start {started:.2f} s, a thread's fresh session elsewhere "
              f"{time.monotonic() - began - started:.2f} s (timeout 1 s per call)")
        assert session.ref.startswith("a/") and note and "unreachable" in note
        assert (await session.run("print(6 * 7)")).stdout.strip() == "42"
    finally:
        await engines.aclose()
        for c in docker_client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_id}"}):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)


def test_doctor_is_ready_while_one_engine_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             docker_client: docker.DockerClient) -> None:
    from bot.ops.doctor import run_checks

    monkeypatch.setenv("CODELOOP_SANDBOX_IMAGE", IMAGE)
    monkeypatch.setenv("CODELOOP_SANDBOX_ENGINES", f"a={MAIN},gone=unix://{tmp_path}/none.sock")
    results = {r.name: r for r in run_checks(["docker", "sandbox"], 5.0)}
    assert results["docker"].status == results["sandbox"].status == "warn"  # warnings do not fail
    assert "1 of 2 sandbox engines ready (a)" in results["sandbox"].text and "gone" in results["sandbox"].text
    monkeypatch.setenv("CODELOOP_SANDBOX_ENGINES", f"gone=unix://{tmp_path}/none.sock")
    results = {r.name: r for r in run_checks(["docker", "sandbox"], 5.0)}
    assert results["docker"].status == results["sandbox"].status == "FAIL"
    assert "no sandbox engine is ready" in results["docker"].text


# --- real workers --------------------------------------------------------------------------
def _code_of(messages: list[dict[str, Any]]) -> str:
    """The scripted model: runs the user's message as a cell, then says it is done."""
    last = messages[-1]["content"]
    return "Done." if last.startswith("Execution result") else f"```python\n{last}\n```"


async def test_workers_keep_a_thread_on_its_engine_and_move_it_when_the_engine_dies(
    model_server: Any, redis_client: Any, make_settings: Callable[..., Settings], key_prefix: str,
    second: Daemon,
) -> None:
    from bot.core.jobs import Conversation, Event, Job
    from bot.queue.stream import JobQueue
    from bot.worker.service import Worker
    from tests.conftest import RunningWorkers

    model_server.script = _code_of
    settings = make_settings(llm_url=model_server.url, sandbox_engines=f"b={second.url},a={MAIN}",
                             sandbox_labels=[f"{TEST_LABEL}={key_prefix}"], sandbox_cell_timeout_s=30.0,
                             sandbox_engine_timeout_s=10.0)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    conversation = Conversation(platform="test", channel="c", thread="engines")
    state_key = queue.conv_key(conversation, "state")

    async def ask(n: int, text: str) -> list[Event]:
        reply = settings.key("replies", f"engines-{n}")
        await queue.enqueue(Job(idempotency_key=f"engines-{n}", user="u", text=text, reply_stream=reply,
                                conversation=conversation))
        deadline = time.monotonic() + 180  # a hang guard, not a timing assertion
        while True:
            events = [Event.loads(f[b"event"]) for _, f in await redis_client.xrange(reply)]
            if any(e.terminal for e in events):
                return events
            assert time.monotonic() < deadline, f"job {n}: no final"
            await asyncio.sleep(0.1)

    async def session_id() -> str:
        return str(json.loads(await redis_client.get(state_key) or "{}").get("session_id"))

    def outputs(events: list[Event]) -> str:
        return "".join(e.payload["text"] for e in events if e.type == "output")

    workers = RunningWorkers()
    try:
        await workers.start(Worker(settings), within_s=60)  # builds its EngineSet from the settings
        assert "set" in outputs(await ask(1, "x = 41\nprint('set')"))
        first = await session_id()
        assert first.startswith("b/")  # a tie goes to the first listed engine
        await workers.stop()

        await workers.start(Worker(settings), within_s=60)  # another worker: reattaches on b
        assert "42" in outputs(await ask(2, "print(x + 1)"))
        assert await session_id() == first

        await asyncio.to_thread(second.stop)  # engine b goes away between jobs
        events = await ask(3, "print('x' in globals())")
        assert "False" in outputs(events)
        assert any(e.type == "status" and "unreachable" in e.payload["text"] for e in events)
        assert [e.type for e in events if e.terminal] == ["final"]
        assert (await session_id()).startswith("a/")
    finally:
        await workers.stop()
        client = docker.from_env()
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={key_prefix}"}):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)
        client.close()
