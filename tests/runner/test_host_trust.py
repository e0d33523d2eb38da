"""The host never trusts the sandbox: bounded lines, every result re-checked, a liar removed.

Hostile "supervisors" (tests/runner/hostile_supervisor.py, run in containers of the real sandbox
image) stand in for a cell that took over its executor; the real SandboxSession attaches to them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from bot.adapters.console import ConsoleRenderer
from bot.core.errors import MalformedReply
from bot.core.jobs import Conversation, Event
from runner.attach import AttachStream
from runner.config import SandboxConfig, container_spec
from runner.results import MAX_RICH_RESULTS, ReplyLimits, parse_result
from runner.session import MALFORMED, SandboxSession
from tests.runner.conftest import IMAGE, TEST_LABEL
from tests.runner.helpers import run_ok

HOSTILE = (Path(__file__).parent / "hostile_supervisor.py").read_text()
MIB = 1 << 20
StartFake = Callable[..., Any]


async def start_fake(api: Any, config: SandboxConfig, mode: str, name: str | None = None) -> SandboxSession:
    """A sandbox container whose executor is the hostile stand-in, attached like the manager does."""
    spec = container_spec(api, config, "hostile")
    spec["Cmd"] = ["python", "-u", "-c", HOSTILE, mode]
    cid = (await asyncio.to_thread(api.create_container_from_config, spec, name))["Id"]
    session = await SandboxSession.attach(api, cid, config)
    await asyncio.to_thread(api.start, cid)
    await session.wait_ready(60)
    return session


def exists(client: docker.DockerClient, cid: str) -> bool:
    try:
        client.containers.get(cid)
    except docker.errors.NotFound:
        return False
    return True


@pytest.fixture
async def fake(
    docker_client: docker.DockerClient, make_config: Callable[..., SandboxConfig]
) -> AsyncIterator[Callable[..., Any]]:
    made: list[SandboxSession] = []

    async def factory(mode: str, **overrides: Any) -> SandboxSession:
        config = make_config(**{"memory": "1g", "max_file_bytes": 10 * MIB, **overrides})
        session = await start_fake(docker_client.api, config, mode)
        made.append(session)
        return session

    yield factory
    for session in made:
        await session.lose("test over")


# --- forged results ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [
    "traversal", "absolute", "newline_nul", "oversize", "lying_size", "too_many_files", "over_total",
    "not_base64", "not_png", "not_jpeg", "wrong_type", "unknown_mime",
])
async def test_a_forged_result_is_refused_and_its_sandbox_removed(
    fake: Callable[..., Any], docker_client: docker.DockerClient, mode: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    session = await fake(mode)
    with pytest.raises(MalformedReply) as caught:
        await session.run("print('hello')")
    assert str(caught.value) == MALFORMED  # what the model is told; the detail is logged
    assert session.lost is not None and "malformed result" in session.lost
    assert not exists(docker_client, session.id)  # removed before the caller heard of it
    assert not await asyncio.to_thread(os.path.exists, "/etc/cron.d/evil")
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


async def test_names_the_host_does_not_pass_on_are_dropped_with_a_note(fake: Callable[..., Any]) -> None:
    session = await fake("control_name")
    result = await session.run("1")
    assert [(f.name, f.data) for f in result.files] == [("ok.txt", b"kept")]
    assert any("'a\\tb.txt'" in note and "not returned" in note for note in result.notes)
    assert (await session.ping())["ok"] is True  # an honest executor can write such a name: kept


async def test_lone_surrogates_never_reach_the_host_unreplaced(fake: Callable[..., Any]) -> None:
    session = await fake("surrogate_text")
    result = await session.run("1")
    assert result.stdout == "bad \ufffd text" and result.files == []
    json.dumps([result.stdout, result.notes]).encode()  # everything is encodable now
    assert any("not UTF-8" in note for note in result.notes)


async def test_what_a_real_cell_returns_is_encodable(session: SandboxSession) -> None:
    """snekbox's cases through the real executor: a file name that is not UTF-8, a repr and an
    error text with a lone surrogate."""
    result = await run_ok(
        session, "open(b'\\xc3.txt', 'w').write('x')\nopen('fine.txt', 'w').write('y')\n"
                 "class R:\n    def __repr__(self):\n        return 'r\\ud800'\nR()")
    assert [f.name for f in result.files] == ["fine.txt"]
    # the executor sends a lone surrogate as a visible escape; the host would replace any left over
    assert result.results[0].text == "r\\ud800"
    error = await session.run("raise ValueError('bad \\udcff')")
    assert error.error is not None and error.error.value == "bad \\udcff"
    json.dumps([result.results[0].data, result.notes, error.error.value, error.error.traceback]).encode()


# --- the attach stream's bounds ----------------------------------------------------------------
CHILD = r"""
import asyncio, json, sys
import docker
from bot.core.errors import SessionLost
from runner.config import SandboxConfig
from tests.runner.test_host_trust import start_fake

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

async def main():
    image, label, run_id, mode = sys.argv[1:5]
    config = SandboxConfig(image=image, labels={label: run_id}, memory="1g", pool_size=0)  # default caps
    api = docker.from_env().api
    session = await start_fake(api, config, mode)
    before = peak_kib()
    try:
        result = await asyncio.wait_for(session.run("1"), 240)
        outcome = f"answered with {len(result.files)} files of {sum(f.size for f in result.files):,} bytes"
        await session.lose("test over")
    except SessionLost as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"id": session.id, "outcome": outcome, "lost": session.lost,
                      "peak_kib": peak_kib(), "before_kib": before, "max_line": session.limits.max_line}))

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["giant_reply", "giant_no_newline", "fake_headers", "amplify"])
async def test_a_flood_on_the_attach_stream_cannot_grow_the_worker(
    docker_client: docker.DockerClient, run_id: str, mode: str
) -> None:
    """A 1 GiB line (or one that never ends, or a short one that parses into millions of objects)
    from the sandbox: the real session, in its own process, stays under 300 MiB peak RSS."""
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CHILD, IMAGE, TEST_LABEL, run_id, mode],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{mode}: peak {report['peak_kib'] / 1024:.0f} MiB (before the reply {report['before_kib'] / 1024:.0f} "
          f"MiB), line cap {report['max_line'] / MIB:.1f} MiB")
    assert report["outcome"] == f"MalformedReply: {MALFORMED}"
    assert report["lost"].startswith("protocol violation")
    assert report["peak_kib"] < 300 * 1024
    assert not exists(docker_client, report["id"])


async def test_the_largest_honest_reply_is_read_within_the_same_bound(
    docker_client: docker.DockerClient, run_id: str
) -> None:
    """Every file at its cap (22 files, 32 MiB together, both output files at 10 MiB): accepted, and
    the worker still stays under 300 MiB while it reads and checks the reply."""
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CHILD, IMAGE, TEST_LABEL, run_id, "max_honest"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"largest honest reply: peak {report['peak_kib'] / 1024:.0f} MiB "
          f"(before {report['before_kib'] / 1024:.0f} MiB), {report['outcome']}")
    assert report["outcome"] == f"answered with 22 files of {20 * MIB + 20 * (12 * MIB // 20):,} bytes"
    assert report["peak_kib"] < 300 * 1024


class FakeEngine:
    """A loopback server that answers the attach upgrade, then sends frames a test wrote: for what
    only a broken or impersonated engine could send (dockerd frames the container's writes itself)."""

    def __init__(self, frames: Callable[[asyncio.StreamWriter], Any]) -> None:
        self.frames = frames
        self.base_url = ""
        self._version = "1.41"

    async def serve(self) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
            try:
                await self.frames(writer)
                await reader.read()  # until the client hangs up
            except ConnectionError:
                pass
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return server


def frame(stream: int, payload: bytes, size: int | None = None) -> bytes:
    return bytes([stream, 0, 0, 0]) + (len(payload) if size is None else size).to_bytes(4, "big") + payload


async def cut_by(frames: Callable[[asyncio.StreamWriter], Any], max_line: int = MIB) -> tuple[str | None, int]:
    engine = FakeEngine(frames)
    server = await engine.serve()
    messages: list[dict[str, Any]] = []
    ended = asyncio.Event()
    try:
        stream = await AttachStream.open(engine, "c0ffee", messages.append, ended.set, max_line)
        await asyncio.wait_for(ended.wait(), 120)
    finally:
        server.close()
    return stream.violation, len(messages)


@pytest.mark.parametrize("header", [
    frame(1, b"", size=0xFFFFFFF0),  # stdout frame declaring 4 GiB
    frame(2, b"", size=64 * MIB),  # stderr frame past its cap
    frame(3, b"{}\n"),  # no such stream
    b"\x01\x07\x00\x00\x00\x00\x00\x03{}\n",  # reserved bytes not zero
])
async def test_frame_headers_are_bounded(header: bytes) -> None:
    async def frames(writer: asyncio.StreamWriter) -> None:
        writer.write(frame(1, b'{"event": "ready"}\n') + header)

    violation, received = await cut_by(frames)
    assert received == 1 and violation is not None and "frame header" in violation


async def test_a_line_of_tiny_frames_stops_at_the_cap() -> None:
    async def frames(writer: asyncio.StreamWriter) -> None:
        tiny = frame(1, b"\x01\x00\x00\x00\xff\xff\xff\xff") * 4096
        for _ in range(64):  # 2 MiB of 8-byte frames, never a newline
            writer.write(tiny)
            await writer.drain()

    violation, _ = await cut_by(frames, max_line=MIB)
    assert violation is not None and "longer than" in violation


@pytest.mark.parametrize("line", [b"not json", b'"a string"', b"[1, 2]", '{"a": "\u00e9"}'.encode(),
                                  b"[" * 100_000 + b"]" * 100_000])
async def test_a_line_that_is_not_an_ascii_json_object_cuts_the_stream(line: bytes) -> None:
    async def frames(writer: asyncio.StreamWriter) -> None:
        writer.write(frame(1, b'{"event": "ready"}\n' + line + b"\n"))

    violation, received = await cut_by(frames)
    assert received == 1 and violation is not None


async def test_a_partial_first_line_is_skipped_not_believed() -> None:
    """A worker that attaches while the executor writes a line (to another worker) gets its tail."""
    async def frames(writer: asyncio.StreamWriter) -> None:
        writer.write(frame(1, b'tail of a reply", "ok": true}\n{"id": "1", "ok": true}\n{"id": "2"'))
        writer.write(frame(1, b', "ok": true}\nnot json either\n'))

    violation, received = await cut_by(frames)
    assert received == 2 and violation is not None and "not JSON" in violation


async def test_stderr_is_logged_not_parsed_and_bounded() -> None:
    async def frames(writer: asyncio.StreamWriter) -> None:
        writer.write(frame(2, b"Traceback: not JSON\n") + frame(1, b'{"id": "1"}\n'))
        for _ in range(20):
            writer.write(frame(2, b"e" * 65536))

    violation, received = await cut_by(frames)
    assert received == 1 and violation is not None and "stderr" in violation


# --- the checks themselves, field by field --------------------------------------------------
def reply(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"stdout": "", "stderr": "", "results": [], "error": None, "files": [],
                            "notes": [], "duration_s": 0.1, "timed_out": False, "oom_killed": False,
                            "truncated": False, "restarted": False}
    base.update(fields)
    return base


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\0" * 40


@pytest.mark.parametrize("raw", [
    reply(files=[{"name": "a/../../b", "size": 1, "data": b64(b"x")}]),
    reply(files=[{"name": "./a", "size": 1, "data": b64(b"x")}]),
    reply(files=[{"name": "a//b", "size": 1, "data": b64(b"x")}]),
    reply(files=[{"name": "x" * 256, "size": 1, "data": b64(b"x")}]),
    reply(files=[{"name": "\ud800.txt", "size": 1, "data": b64(b"x")}]),
    reply(files=[{"name": 7, "size": 1, "data": b64(b"x")}]),
    reply(files=[{"name": "a", "size": True, "data": b64(b"x")}]),
    reply(files=[{"name": "a", "size": 1, "data": "eA"}]),  # padding missing
    reply(files=[{"name": "a", "size": 1, "data": "eA==eA=="}]),
    reply(results=[{"kind": "display_data", "data": {"image/png": b64(PNG[:7])}}]),
    reply(results=[{"kind": "evil", "data": {"text/plain": "x"}}]),
    reply(results=[{"kind": "display_data", "data": {"text/html": "x" * 200_001}}]),
    reply(results=["text"]),
    reply(error={"name": "E", "value": 3, "traceback": ""}),
    reply(notes="a note"),
    reply(duration_s="1"),
    # CPU seconds: a number, finite, >= 0, within a ceiling no honest cell reaches
    reply(cpu_s=-0.5), reply(cpu_s=float("nan")), reply(cpu_s=float("inf")), reply(cpu_s=1e9),
    reply(cpu_s=10**400), reply(cpu_s="0.3"), reply(cpu_s=True), reply(cpu_s=[0.3]),
    reply(timed_out=1),
    ["not", "a", "dict"],
])
def test_parse_refuses_what_no_honest_executor_sends(raw: Any) -> None:
    with pytest.raises(MalformedReply):
        parse_result(raw, ReplyLimits())


def test_parse_keeps_what_is_honest_and_cuts_what_is_long() -> None:
    limits = ReplyLimits(text_chars=100, max_files=3, max_file_bytes=64, max_total_file_bytes=13)
    result = parse_result(reply(
        stdout="s" * 500, stderr="e\ud83d",
        results=[{"kind": "execute_result", "data": {"text/plain": "1", "image/png": b64(PNG)}}],
        files=[{"name": "dir/a.csv", "size": 3, "data": b64(b"a,b"), "mime": "text/html"},
               {"name": "b.bin", "size": 10, "data": b64(b"0" * 10)}],
        error={"name": "ValueError", "value": "v\udcff", "traceback": "t"}, duration_s=2,
    ), limits)
    assert result.stdout.startswith("s" * 100) and len(result.stdout) < 200 and result.stderr == "e\ufffd"
    # the MIME type the sandbox claims is not believed: it is guessed from the name
    assert [(f.name, f.mime) for f in result.files] == [
        ("dir/a.csv", "text/csv"), ("b.bin", "application/octet-stream")]
    assert result.images == [("image/png", b64(PNG))] and result.error is not None
    assert result.error.value == "v\ufffd" and result.duration_s == 2.0
    with pytest.raises(MalformedReply, match="together"):  # 14 bytes against a total of 13
        parse_result(reply(files=[{"name": f"f{i}", "size": 7, "data": b64(b"0" * 7)} for i in range(2)]), limits)


def test_cpu_seconds_are_kept_when_honest_and_unknown_when_absent() -> None:
    assert parse_result(reply(cpu_s=0.25), ReplyLimits()).cpu_s == 0.25
    assert parse_result(reply(cpu_s=0), ReplyLimits()).cpu_s == 0.0
    assert parse_result(reply(), ReplyLimits()).cpu_s is None  # an executor that cannot measure it


def test_too_many_rich_results_are_cut_with_a_note() -> None:
    many = [{"kind": "display_data", "data": {"text/plain": str(i)}} for i in range(MAX_RICH_RESULTS + 5)]
    result = parse_result(reply(results=many), ReplyLimits())
    assert len(result.results) == MAX_RICH_RESULTS and "displayed results" in result.notes[-1]


def test_the_line_cap_follows_the_config() -> None:
    default = ReplyLimits.from_config(SandboxConfig())
    # every file (output files included) at the total cap in base64, the text fields escaped: and
    # never looser than the executor's own bound on its replies
    config = SandboxConfig()
    assert 4 * 32 * MIB // 3 < default.max_line <= config.max_reply_bytes < 100 * MIB
    bigger = ReplyLimits.from_config(SandboxConfig(max_total_file_bytes=64 * MIB))
    assert bigger.max_line - default.max_line >= 4 * 32 * MIB // 3


# --- the console writes under its folder only --------------------------------------------------
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/cron.d/evil", "..", "a\\..\\..\\b", "x\nb", ".bashrc"])
def test_the_console_saves_under_its_folder_only(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    renderer = ConsoleRenderer(out, interactive=False)
    event = Event(job_id="j", conversation=Conversation(platform="console", workspace="w", channel="c",
                                                        thread="../t"), seq=1, type="file",
                  payload={"name": name, "data_b64": b64(b"data")})
    renderer.render(event)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1 and written[0].parent.parent == out.resolve() and written[0].read_bytes() == b"data"
    assert "\n" not in written[0].name and not written[0].name.startswith(".")
