"""Redis behind Sentinel: a master, two replicas and three sentinels of Debian's redis-server on
loopback. The master is killed (-9) while jobs stream through a real worker with real sandboxes;
the sentinels promote a replica, and the worker, the producer and the reply reader follow it by
themselves: every job finishes once, no final is lost or doubled, and a thread's follow-up still
sees the Python variables of its live sandbox. With CODELOOP_REDIS_MIN_REPLICAS an enqueue is on
a replica before it returns, and fails when too few replicas answer."""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis

from bot.core.errors import ConfigError, QueueError
from bot.core.jobs import Conversation, Event, Job
from bot.core.settings import Settings
from bot.queue import redis_conn
from bot.queue.render_lease import TOMBSTONE, LeasedReader, RenderLeases
from bot.queue.replies import ReplyReader
from bot.queue.stream import JobQueue

MASTER = "codeloop-test"
JOBS = 240
THREADS = 8
CODE_THREADS = ("th0", "th1")  # threads with a live sandbox holding a variable across the failover


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(what: str, ok: Any, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if ok():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within_s:g} s")
        time.sleep(0.05)


class SentinelCluster:
    """A master, ``replicas`` replicas (AOF on, as in production) and three sentinels watching it
    with a quorum of two; each process on a free loopback port, its files in a test directory."""

    def __init__(self, workdir: Path, replicas: int = 2) -> None:
        self.dir = workdir
        self.ports = [_free_port() for _ in range(1 + replicas)]  # [0] is the first master
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def _spawn(self, port: int, args: list[str]) -> None:
        log = (self.dir / f"{port}.log").open("wb")
        self.procs[port] = subprocess.Popen(["redis-server", *args], stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> None:
        for i, port in enumerate(self.ports):
            data = self.dir / str(port)
            data.mkdir()
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
                    "--appendfsync", "everysec", "--save", ""]
            if i:
                args += ["--replicaof", "127.0.0.1", str(self.ports[0])]
            self._spawn(port, args)
        for port in self.ports[1:]:
            _wait_for(f"replica {port} in sync",
                      lambda port=port: redis.Redis(port=port).info("replication")["master_link_status"] == "up")
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"  # a sentinel rewrites its own file
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.ports[0]} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\n"
                            f"sentinel parallel-syncs {MASTER} 2\n")
            self._spawn(port, [str(conf), "--sentinel"])
        for port in self.sentinel_ports:  # each sees both replicas and both other sentinels
            def ready(port: int = port) -> bool:
                state = redis.Redis(port=port).sentinel_master(MASTER)
                return bool(state["num-slaves"] == len(self.ports) - 1 and state["num-other-sentinels"] == 2)
            _wait_for(f"sentinel {port} ready", ready, within_s=60)

    def master_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                return int(redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no sentinel answers")

    def shutdown(self, port: int) -> None:
        """SHUTDOWN NOSAVE: Redis 7 first lets its replicas catch up, then closes every client and
        exits (what stopping its container or process does)."""
        try:
            redis.Redis(port=port).shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        self.procs[port].wait(timeout=30)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _sentinel_settings(cluster: SentinelCluster, **more: Any) -> dict[str, Any]:
    # the URL's host and port are never dialled behind Sentinel: port 1 would refuse
    return {"redis_url": "redis://127.0.0.1:1/0", "redis_sentinels": cluster.sentinels,
            "redis_sentinel_master": MASTER, **more}


def _model(messages: list[dict[str, Any]]) -> str:
    """Text questions are answered in words; ``set thN K`` and ``get thN`` run Python."""
    last = messages[-1]["content"]
    if last.startswith("Execution result"):
        return "seen: " + last
    if m := re.fullmatch(r"set (th\d+) (\d+)", last):
        return f"```python\nvalue_{m.group(1)} = {m.group(2)}\nprint('stored')\n```"
    if m := re.fullmatch(r"get (th\d+)", last):
        return f"```python\nprint('value is', value_{m.group(1)})\n```"
    return f"answer to {last}"


def _containers(key_prefix: str) -> set[str]:
    client = docker.from_env()
    try:
        return {c.id for c in client.containers.list(all=True, filters={"label": f"codeloop.test={key_prefix}"})}
    finally:
        client.close()


@pytest.mark.parametrize("how,reader_kind", [("kill -9", "group"), ("SHUTDOWN NOSAVE", "group"),
                                             ("kill -9", "leased")])
async def test_master_lost_mid_stream_every_job_finishes_once_and_threads_keep_their_sandbox(
        how: str, reader_kind: str, cluster: SentinelCluster, start_worker: Any, model_server: Any,
        make_settings: Any, key_prefix: str) -> None:
    """``group``: the plain reply reader (Discord, the console); ``leased``: the render-lease path
    Slack replicas use (bot/queue/render_lease.py), committing each event as a renderer does."""
    model_server.script = _model
    overrides = _sentinel_settings(cluster, worker_concurrency=8, claim_idle_s=2.0, rate_user_per_min=0,
                                   rate_channel_per_min=0, worker_user_concurrency=8, redis_min_replicas=1)
    settings: Settings = make_settings(llm_url=model_server.url, **overrides)
    await start_worker(**overrides)
    producer = redis_conn.connect(settings)
    queue = JobQueue(producer, settings)
    reader_redis = redis_conn.connect(settings)
    rendered: list[Event] = []
    stop_reading = asyncio.Event()
    if reader_kind == "group":
        reader = ReplyReader(reader_redis, settings, "t")
        stream = reader.stream

        async def render(event: Event) -> None:
            rendered.append(event)

        reading = asyncio.create_task(reader.run(render, stop_reading, block_ms=200))
    else:
        leases = RenderLeases(reader_redis, settings, "t")
        stream = leases.stream

        async def deliver(event: Event, entry: str) -> None:
            # as the Slack renderer does (SlackRenderer._restore): a finished job's tombstone drops
            # what a re-run of it publishes again
            if await reader_redis.get(leases.state_key(event.job_id)) == TOMBSTONE:
                await leases.finish(event.job_id)
                return
            rendered.append(event)
            if event.terminal:
                await leases.finish(event.job_id)
            else:
                await leases.commit(event.job_id, [entry], f'{{"seq":{event.seq}}}')

        reading = asyncio.create_task(LeasedReader(leases, block_ms=200).run(deliver, stop_reading))
    job_ids: dict[str, str] = {}  # idempotency key -> job id
    texts: dict[str, str] = {}  # job id -> the final text it must end with (None: checked apart)
    producer_retries = 0

    def job(key: str, thread: str, text: str) -> Job:
        return Job(idempotency_key=key, user=f"u{thread}", text=text, reply_stream=stream,
                   conversation=Conversation(platform="test", channel="c", thread=thread))

    async def enqueue(item: Job) -> str:
        nonlocal producer_retries
        while True:  # a platform redelivers an event it got no ack for: same event id
            try:
                result = await queue.enqueue(item)
                break
            except Exception:
                producer_retries += 1
                await asyncio.sleep(0.2)
        job_ids[item.idempotency_key] = result.job_id
        return result.job_id

    async def finals_for(ids: set[str], within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while not ids <= {e.job_id for e in rendered if e.terminal}:
            assert time.monotonic() < deadline, f"{len(ids - {e.job_id for e in rendered if e.terminal})} " \
                                                "jobs have no final"
            await asyncio.sleep(0.05)

    # each code thread stores a variable in its sandbox before the failover
    setters = {thread: await enqueue(job(f"set-{thread}", thread, f"set {thread} {41 + i}"))
               for i, thread in enumerate(CODE_THREADS)}
    await finals_for(set(setters.values()), within_s=120)
    sandboxes = _containers(key_prefix)
    assert len(sandboxes) == len(CODE_THREADS)

    async def produce() -> None:
        for i in range(JOBS):
            job_id = await enqueue(job(f"ev-{i}", f"th{i % THREADS}", f"question {i}"))
            texts[job_id] = f"answer to question {i}"
            await asyncio.sleep(0.01)

    old_master = cluster.master_port()
    producing = asyncio.create_task(produce())
    while len(texts) < JOBS // 3:
        await asyncio.sleep(0.01)
    finished_before = sum(e.terminal for e in rendered)
    t_kill = time.monotonic()
    if how == "kill -9":
        await asyncio.to_thread(cluster.kill, old_master)
    else:
        await asyncio.to_thread(cluster.shutdown, old_master)
    while await asyncio.to_thread(cluster.master_port) == old_master:
        assert time.monotonic() - t_kill < 60, "the sentinels promoted no replica"
        await asyncio.sleep(0.05)
    promoted_s = time.monotonic() - t_kill
    while sum(e.terminal for e in rendered) <= finished_before + 1 and time.monotonic() - t_kill < 60:
        await asyncio.sleep(0.02)
    flowing_s = time.monotonic() - t_kill  # a final rendered from the new master
    await asyncio.wait_for(producing, timeout=120)
    await finals_for(set(texts), within_s=120)

    # follow-ups in the code threads: the same live sandbox, its variables intact
    getters = {thread: await enqueue(job(f"get-{thread}", thread, f"get {thread}")) for thread in CODE_THREADS}
    await finals_for(set(getters.values()), within_s=120)
    await asyncio.sleep(1.0)  # a doubled final, if any, would be rendered by now
    stop_reading.set()
    await reading

    raw = [Event.loads(f[b"event"]) for _, f in await producer.xrange(stream)]
    raw_finals = collections.Counter(e.job_id for e in raw if e.terminal)
    shown_finals = collections.Counter(e.job_id for e in rendered if e.terminal)
    ids = set(job_ids.values())
    lost = ids - set(shown_finals)
    doubled = [j for j, n in shown_finals.items() if n > 1]  # shown twice to the user
    published_twice = [j for j, n in raw_finals.items() if n > 1]  # on the new master's stream
    print(f"\nsentinel failover ({how}, {reader_kind} reader): replica promoted {promoted_s:.2f}s after the "
          f"master went, finals "
          f"flowing again after {flowing_s:.2f}s; jobs {len(ids)}: finished {len(shown_finals)}, lost "
          f"{len(lost)}, doubled {len(doubled)} (published twice {len(published_twice)}); producer-level "
          f"retries {producer_retries}")
    assert len(ids) == JOBS + 2 * len(CODE_THREADS), "an event id was enqueued as two jobs"
    shown_twice = [(e.job_id[:8], e.seq, e.type, str(e.payload.get("text", ""))[:40]) for e in rendered
                   if e.terminal and e.job_id in doubled]
    assert not lost and not doubled and not published_twice, shown_twice
    by_id = {e.job_id: e for e in rendered if e.terminal}
    wrong = [j for j, text in texts.items() if by_id[j].type != "final" or by_id[j].payload.get("text") != text]
    assert not wrong, f"{len(wrong)} jobs ended wrong, e.g. {by_id[wrong[0]].payload}"
    for i, thread in enumerate(CODE_THREADS):
        answer = by_id[getters[thread]].payload.get("text", "")
        assert f"value is {41 + i}" in answer, answer
    assert _containers(key_prefix) == sandboxes, "a thread lost its sandbox in the failover"
    assert (await queue.depth())["pending"] == 0
    assert await producer.xlen(settings.key("dead")) == 0
    await producer.aclose()
    await reader_redis.aclose()


async def test_min_replicas_puts_an_enqueue_on_a_replica_before_it_returns(
        cluster: SentinelCluster, make_settings: Any) -> None:
    settings: Settings = make_settings(**_sentinel_settings(cluster, redis_min_replicas=2))
    client = redis_conn.connect(settings)
    queue = JobQueue(client, settings)
    try:
        await client.script_flush()  # the first enqueue meets NOSCRIPT, as on a new master
        result = await queue.enqueue(Job(idempotency_key="e1", user="u", text="hi", reply_stream="r",
                                         conversation=Conversation(platform="test", channel="c", thread="t")))
        for port in cluster.ports[1:]:  # already on both replicas when enqueue returned
            entries = redis.Redis(port=port).xrange(settings.key("jobs"))
            assert [e[1][b"seq"] for e in entries] == [b"1"], port
        assert result.created
        # a "reply shown" claim too: on both replicas before the reply is rendered
        assert await redis_conn.claim_once(client, settings.key("rendered", "j", "terminal"), 60, replicas=2)
        for port in cluster.ports[1:]:
            assert redis.Redis(port=port).exists(settings.key("rendered", "j", "terminal")), port

        cluster.kill(cluster.ports[2])  # one replica left: two can no longer be reached
        slow = make_settings(**_sentinel_settings(cluster, redis_min_replicas=2, redis_replica_wait_ms=200))
        with pytest.raises(QueueError, match="reached 1 of the 2"):
            await JobQueue(client, slow).enqueue(Job(
                idempotency_key="e2", user="u", text="hi", reply_stream="r",
                conversation=Conversation(platform="test", channel="c", thread="t")))
    finally:
        await client.aclose()


async def test_the_probe_and_the_doctor_find_the_master_through_the_sentinels(
        cluster: SentinelCluster, make_settings: Any) -> None:
    settings: Settings = make_settings(**_sentinel_settings(cluster))
    client = redis_conn.connect(settings)
    await redis_conn.check(client, settings)
    assert await client.set("k", "v")
    sync = redis_conn.sync_client(settings, 5.0)
    assert sync.info("server")["tcp_port"] == cluster.ports[0]
    sync.close()
    await client.aclose()
    wrong = make_settings(**_sentinel_settings(cluster, redis_sentinel_master="nope"))
    with pytest.raises(QueueError, match="master 'nope' of the sentinels"):
        await redis_conn.check(client, wrong)


def test_sentinel_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="CODELOOP_REDIS_SENTINEL_MASTER is required"):
        Settings.load(llm_url="http://x", redis_sentinels="127.0.0.1:26379")
    with pytest.raises(ConfigError, match="is not host:port"):
        Settings.load(llm_url="http://x", redis_sentinels="127.0.0.1", redis_sentinel_master="m")
    settings = Settings.load(llm_url="http://x", redis_sentinels="a:1, [::1]:26379", redis_sentinel_master="m")
    assert settings.redis_sentinels == ["a:1", "[::1]:26379"]
