"""The hostile-code battery: each attack runs for real and its exact outcome is asserted, while a
bystander session (another thread's sandbox) keeps answering normal cells during and after it."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable

import pytest

from runner.manager import SandboxManager
from runner.results import ExecutionResult
from runner.session import SandboxSession
from tests.runner.helpers import run_ok

FAKE_SECRET = "xoxb-fake-secret-4f1c2d"


async def attack(
    manager: SandboxManager, code: str, limit: float | None = None
) -> tuple[ExecutionResult, SandboxSession]:
    """Run ``code`` in a fresh session while a bystander session runs normal cells."""
    (victim, _), (bystander, _) = await asyncio.gather(
        manager.acquire(None, "victim"), manager.acquire(None, "bystander")
    )
    await run_ok(bystander, "total = 0")
    running = asyncio.create_task(victim.run(code, timeout=limit))
    during = 0
    while not running.done():
        result = await run_ok(bystander, "total += 1\ntotal")
        during += 1
        assert result.results[0].text == str(during)
        await asyncio.sleep(0.05)
    result = await running
    assert during >= 1
    assert (await run_ok(bystander, "total")).results[0].text == str(during)
    return result, victim


async def assert_usable(session: SandboxSession) -> None:
    assert (await run_ok(session, "sum(range(10))")).results[0].text == "45"


async def test_infinite_loop(manager: SandboxManager) -> None:
    result, victim = await attack(manager, "x = 1\nwhile True:\n    pass")
    assert result.timed_out and not result.restarted and not result.oom_killed
    assert result.error is not None and result.error.name == "TimeoutError"
    assert (await run_ok(victim, "x")).results[0].text == "1"


async def test_sleep_past_timeout(manager: SandboxManager) -> None:
    result, victim = await attack(manager, "import time\ntime.sleep(60)", limit=1)
    assert result.timed_out and result.duration_s < 2
    await assert_usable(victim)


async def test_memory_bomb(manager: SandboxManager) -> None:
    result, victim = await attack(
        manager, "chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)", limit=20
    )
    assert result.oom_killed and result.restarted and not result.timed_out
    assert result.error is not None and result.error.name == "MemoryError"
    await assert_usable(victim)


async def test_fork_bomb(manager: SandboxManager) -> None:
    code = (
        "import os, time\npids = []\ntry:\n    while True:\n        pid = os.fork()\n"
        "        if pid == 0:\n            time.sleep(30)\n            os._exit(0)\n"
        "        pids.append(pid)\n"
        "except OSError as exc:\n    print(type(exc).__name__, exc.errno, len(pids) > 50)\n"
        "finally:\n    for pid in pids:\n        os.kill(pid, 9)\n        os.waitpid(pid, 0)\n"
    )
    result, victim = await attack(manager, code, limit=20)
    assert result.error is None
    assert result.stdout == f"BlockingIOError {errno.EAGAIN} True\n"
    await assert_usable(victim)


async def test_stdout_flood(manager: SandboxManager) -> None:
    result, _ = await attack(manager, "for i in range(100_000):\n    print(i)", limit=20)
    assert result.error is None and result.truncated
    assert len(result.stdout) < 2200
    assert result.stdout.startswith("0\n1\n2\n") and result.stdout.endswith("99998\n99999\n")
    full = next(f for f in result.files if f.name == "stdout.txt")
    assert full.data == b"".join(b"%d\n" % i for i in range(100_000))
    assert any("stdout.txt" in note for note in result.notes)


async def test_one_huge_line(manager: SandboxManager) -> None:
    result, _ = await attack(manager, "print('y' * 5_000_000, end='')", limit=20)
    assert result.truncated and len(result.stdout) < 2200
    full = next(f for f in result.files if f.name == "stdout.txt")
    assert full.size == 1024 * 1024  # capped at max_file_bytes; the note says the rest was dropped
    assert any("dropped" in note for note in result.notes)


async def test_non_utf8_output(manager: SandboxManager) -> None:
    result, _ = await attack(
        manager,
        "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\xc3(')\nsys.stdout.flush()\nprint('\\udcff')",
    )
    assert result.error is None
    assert result.stdout == "ok \ufffd\ufffd\ufffd(\\udcff\n"


@pytest.mark.parametrize("target", ["/mnt/data/fill", "/tmp/fill"])
async def test_disk_fill(manager: SandboxManager, target: str) -> None:
    code = (
        f"try:\n    with open({target!r}, 'wb') as fh:\n        while True:\n"
        "            fh.write(b'0' * 2**20)\n            fh.flush()\nexcept OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno)"
    )
    result, victim = await attack(manager, code)
    assert result.stdout == f"OSError {errno.ENOSPC}\n"
    await assert_usable(victim)


async def test_writes_to_system_dirs(session: SandboxSession) -> None:
    code = (
        "import errno\nout = {}\nfor path in ['/x', '/etc/x', '/usr/x', '/opt/codeloop/kernel.py', "
        "'/etc/passwd']:\n    try:\n        open(path, 'a').write('x')\n        out[path] = 'written'\n"
        "    except OSError as exc:\n        out[path] = errno.errorcode[exc.errno]\nout"
    )
    result = await run_ok(session, code)
    assert result.results[0].text == (
        "{'/x': 'EROFS', '/etc/x': 'EROFS', '/usr/x': 'EROFS', "
        "'/opt/codeloop/kernel.py': 'EACCES', '/etc/passwd': 'EACCES'}"
    )  # new names: the read-only root answers; existing root-owned files: permissions answer first


async def test_environment_has_no_worker_secrets(
    monkeypatch: pytest.MonkeyPatch, make_manager: Callable[..., Awaitable[SandboxManager]]
) -> None:
    monkeypatch.setenv("CODELOOP_SLACK_BOT_TOKEN", FAKE_SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    manager = await make_manager()
    session, _ = await manager.acquire(None, "env")
    result = await run_ok(
        session,
        "import os\nfor p in ('/proc/1/environ', '/proc/self/environ', "
        "f'/proc/{os.getppid()}/environ'):\n    print(open(p, 'rb').read())\n"
        "sorted(os.environ)",
    )
    assert FAKE_SECRET not in result.stdout
    assert "CODELOOP" not in result.stdout and "AWS" not in result.stdout
    names = eval(result.results[0].text or "[]")
    assert not [n for n in names if "TOKEN" in n or "SECRET" in n or n.startswith("CODELOOP")]


async def test_no_docker_socket(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "import os, glob\n[p for p in ['/var/run/docker.sock', '/run/docker.sock'] "
        "if os.path.exists(p)] + glob.glob('/**/*.sock', recursive=False)",
    )
    assert result.results[0].text == "[]"


async def test_network_only_loopback(session: SandboxSession) -> None:
    code = (
        "import os, socket, errno\nprint(sorted(os.listdir('/sys/class/net')))\n"
        "s = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', 6379))\n"
        "    print('connected')\nexcept OSError as exc:\n    print(errno.errorcode[exc.errno])"
    )
    result = await run_ok(session, code)
    assert result.stdout == "['lo']\nECONNREFUSED\n"


async def test_setuid_and_capabilities(session: SandboxSession) -> None:
    code = (
        "import os\nout = []\nfor call in (lambda: os.setuid(0), lambda: os.setgid(0), "
        "lambda: os.chown('/mnt/data', 0, 0), lambda: os.chroot('/tmp')):\n    try:\n        call()\n"
        "        out.append('allowed')\n    except OSError as exc:\n        out.append(type(exc).__name__)\n"
        "lines = open('/proc/self/status').read().splitlines()\n"
        "status = dict(l.split(':\\t', 1) for l in lines if ':\\t' in l)\n"
        "(out, os.getuid(), status['CapEff'], status['CapBnd'], status['NoNewPrivs'])"
    )
    result = await run_ok(session, code)
    assert result.results[0].text == (
        "(['PermissionError', 'PermissionError', 'PermissionError', 'PermissionError'], 10001, "
        "'0000000000000000', '0000000000000000', '1')"
    )


async def test_ctypes_segfault(manager: SandboxManager) -> None:
    result, victim = await attack(manager, "x = 1\nimport ctypes\nctypes.string_at(0)")
    assert result.restarted and not result.oom_killed
    assert result.error is not None and result.error.name == "KernelDied"
    assert "SIGSEGV" in result.error.value
    assert "Segmentation fault" in result.stderr
    after = await victim.run("x")
    assert after.error is not None and after.error.name == "NameError"
    await assert_usable(victim)


async def test_kill_pid_1(manager: SandboxManager) -> None:
    result, victim = await attack(
        manager, "import os, signal\nos.kill(1, signal.SIGKILL)\nimport time\ntime.sleep(0.3)\nz = 7"
    )
    assert result.error is None
    assert (await run_ok(victim, "z")).results[0].text == "7"


async def test_thousand_tiny_files(manager: SandboxManager) -> None:
    result, victim = await attack(
        manager, "for i in range(1000):\n    open(f'f{i:04}.txt', 'w').write(str(i))"
    )
    assert result.error is None
    assert [f.name for f in result.files] == [f"f{i:04}.txt" for i in range(20)]
    assert any("980 more" in note for note in result.notes)
    await assert_usable(victim)


async def test_symlink_to_host_path_not_returned(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/etc', 'etc')\n"
        "open('real.txt', 'w').write('r')",
    )
    assert [f.name for f in result.files] == ["real.txt"]
    assert any("passwd" in note for note in result.notes)
