"""The hostile-code battery: each attack runs for real and its exact outcome is asserted, while a
bystander session (another thread's sandbox) keeps answering normal cells during and after it."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import socket
import struct
import sys
from collections.abc import Awaitable, Callable

import docker
import pytest

from runner.config import RESULTS_BYTES
from runner.manager import SandboxManager
from runner.results import ExecutionResult
from runner.session import SandboxSession
from tests.runner.helpers import literal, run_ok

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
    assert literal(result.results[0].text) == literal(
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
        "import os\nfor p in ('/proc/1/environ', '/proc/self/environ'):\n    try:\n"
        "        print(open(p, 'rb').read())\n    except PermissionError:\n        print(p, 'closed')\n"
        "sorted(os.environ)",
    )
    assert "/proc/1/environ closed" in result.stdout  # the supervisor (PID 1) is not dumpable
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
        "(out, os.getuid() >= 2**20, status['CapEff'], status['CapBnd'], status['NoNewPrivs'])"
    )
    result = await run_ok(session, code)
    assert literal(result.results[0].text) == literal(
        "(['PermissionError', 'PermissionError', 'PermissionError', 'PermissionError'], True, "
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


async def test_kernel_killed_by_a_nameless_signal(session: SandboxSession) -> None:
    result = await session.run("import os\nos.kill(os.getpid(), 40)  # real-time: no name in signal.Signals")
    assert result.restarted and result.error is not None
    assert result.error.value == "The Python process died (signal 40)."
    await assert_usable(session)


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


# --- the supervisor is out of a cell's reach (PID 1, non-dumpable, replies authenticated) ---------


async def test_signals_to_pid_1_change_nothing(manager: SandboxManager) -> None:
    code = (
        "import os, signal\nfor sig in sorted(signal.valid_signals()):\n    os.kill(1, sig)\n"
        "try:\n    os.kill(-1, signal.SIGKILL)  # every process but PID 1 and this one (none here)\n"
        "except ProcessLookupError:\n    pass\n"
        "state = [l for l in open('/proc/1/status') if l.startswith('State:')][0].split()[1]\nz = 7\nstate"
    )
    result, victim = await attack(manager, code)
    assert result.error is None and result.results[0].text in ("'S'", "'R'")  # not 'T' (stopped)
    assert (await run_ok(victim, "z")).results[0].text == "7"  # the same kernel answers the next cell


async def test_the_engine_still_stops_the_sandbox(session: SandboxSession, docker_client: docker.DockerClient) -> None:
    # SIGTERM from outside the container (docker stop) is honoured: exit status 0, not the
    # SIGKILL (137) the engine sends when its stop timeout runs out.
    await run_ok(session, "import os, signal\nos.kill(1, signal.SIGTERM)")  # from inside: ignored
    waited = asyncio.create_task(asyncio.to_thread(docker_client.api.wait, session.id))
    await asyncio.to_thread(docker_client.api.stop, session.id, timeout=120)
    assert (await waited)["StatusCode"] == 0


async def test_pid_1_fds_memory_and_ptrace_are_closed_to_cells(session: SandboxSession) -> None:
    code = (
        "import ctypes, errno, os\nout = {}\n"
        "for path, mode in [('/proc/1/fd/1', 'w'), ('/proc/1/fd/0', 'rb'), ('/proc/1/mem', 'rb')]:\n"
        "    try:\n        open(path, mode)\n        out[path] = 'opened'\n"
        "    except OSError as exc:\n        out[path] = type(exc).__name__\n"
        "try:\n    os.listdir('/proc/1/fd')\n    out['ls'] = 'listed'\nexcept OSError as exc:\n"
        "    out['ls'] = type(exc).__name__\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "out['ptrace'] = (libc.ptrace(16, 1, None, None), errno.errorcode[ctypes.get_errno()])  # ATTACH\n"
        "out['self'] = open('/proc/self/oom_score_adj').read().strip()  # the kernel stays dumpable\nout"
    )
    result = await run_ok(session, code)
    assert literal(result.results[0].text) == literal(
        "{'/proc/1/fd/1': 'PermissionError', '/proc/1/fd/0': 'PermissionError', "
        "'/proc/1/mem': 'PermissionError', 'ls': 'PermissionError', 'ptrace': (-1, 'EPERM'), 'self': '1000'}"
    )


#: a cell's code that finds the kernel's own pipes or sockets (its command and reply channels)
CHANNELS = (
    "import os\nfds = []\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n"
    "        if int(fd) > 2 and os.readlink(f'/proc/self/fd/{fd}').startswith(KINDS):\n"
    "            fds.append(int(fd))\n    except OSError:\n        pass  # the listing's own fd\n"
)


async def test_a_forked_child_cannot_answer_for_the_kernel(session: SandboxSession) -> None:
    # The child finds the kernel's reply channel and writes a well-formed answer first, claiming
    # the kernel's pid; the supervisor knows the writer's real pid and ignores it.
    code = (
        "import json, os, sys\nn = int(get_ipython().execution_count)\n"
        + CHANNELS.replace("KINDS", "('socket:', 'pipe:')")
        + "forged = {'t': 'done', 'n': n, 'pid': os.getpid(), 'error': None, 'notes': [], "
        "'results': [{'kind': 'execute_result', 'data': {'text/plain': 'FORGED'}}]}\n"
        "child = os.fork()\nif child == 0:\n    for fd in fds:\n        try:\n"
        "            os.write(fd, (json.dumps(forged) + '\\n').encode())\n        except OSError:\n"
        "            pass\n    os._exit(0)\n"
        "os.waitpid(child, 0)\nprint('real')\n'genuine'"
    )
    result = await run_ok(session, code)
    assert [r.text for r in result.results] == ["'genuine'"]
    assert result.stdout == "real\n"
    assert any("other processes wrote on the kernel's channel were ignored" in note for note in result.notes)


# --- what a cell leaves behind dies with it --------------------------------------------------------

PROCESSES = "import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, os.getpid()]"


async def test_background_processes_do_not_outlive_their_cell(session: SandboxSession) -> None:
    await run_ok(
        session,
        "import os, subprocess, time\nsubprocess.Popen(['sh', '-c', 'sleep 1; echo late > late.txt'])\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n"
        "    os._exit(0)\n",
    )
    assert (await run_ok(session, PROCESSES)).results[0].text == "True"  # no process, no zombie


async def test_fork_bomb_leftovers_stop_with_the_cell(manager: SandboxManager) -> None:
    code = (
        "import os, time\nif os.fork() == 0:\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n"
        "time.sleep(1)\nlen([p for p in os.listdir('/proc') if p.isdigit()]) > 100\n"
    )
    result, victim = await attack(manager, code, limit=20)
    assert result.error is None and result.results[0].text == "True"  # the bomb did fill the pid limit
    assert (await run_ok(victim, PROCESSES)).results[0].text == "True"
    await assert_usable(victim)


async def test_dev_shm_is_emptied_after_a_sigbus_restart(manager: SandboxManager) -> None:
    code = (
        "import mmap, os\nfd = os.open('/dev/shm/fill', os.O_CREAT | os.O_RDWR)\n"
        "os.ftruncate(fd, 128 * 2**20)\nm = mmap.mmap(fd, 128 * 2**20)\n"
        "for i in range(0, 128 * 2**20, 4096):\n    m[i] = 1\n"
    )
    result, victim = await attack(manager, code)  # /dev/shm is 64 MiB: touching past it is SIGBUS
    assert result.restarted and result.error is not None and "SIGBUS" in result.error.value
    after = await run_ok(victim, "import os\nos.listdir('/dev/shm')")
    assert after.results[0].text == "[]"
    await run_ok(victim, "open('/dev/shm/again', 'wb').write(b'0' * 32 * 2**20)")  # the space is back


async def test_reset_gives_a_clean_session(session: SandboxSession) -> None:
    await run_ok(
        session,
        "import ctypes, os\nopen('/mnt/data/keep.txt', 'w').write('k')\n"
        "open('/dev/shm/seg', 'wb').write(b'0' * 2**20)\nos.makedirs('/tmp/deep/er')\n"
        "open('/tmp/deep/er/f', 'w').write('x')\nos.chmod('/tmp/deep', 0)\nopen('/tmp/.hidden', 'w').write('h')\n"
        "assert ctypes.CDLL(None).shmget(0, 2**20, 0o1600) >= 0  # System V shared memory outlives processes\n"
        "x = 1",
    )
    await session.reset()
    result = await run_ok(
        session,
        "import os\nimport matplotlib.pyplot as plt\n"
        "(os.listdir('/dev/shm'), sorted(os.listdir('/tmp')), open('/proc/sysvipc/shm').read().count('\\n'), "
        "os.listdir('/mnt/data'), 'x' in globals())",
        timeout=60,  # the first import of matplotlib is slow on a busy machine
    )
    # header line only; in /tmp only the kernel's own directories (IPython's, pip's site, matplotlib's)
    assert result.results[0].text == "([], ['.ipython', '.local', '.mpl'], 1, ['keep.txt'], False)"
    assert (await run_ok(session, PROCESSES)).results[0].text == "True"


# --- files: total cap, sparse files, names that are not text -----------------------------------------


async def test_sparse_files_are_judged_by_size_before_reading(
    make_manager: Callable[..., Awaitable[SandboxManager]],
) -> None:
    manager = await make_manager(max_total_file_bytes=4 * 1024 * 1024)
    session, _ = await manager.acquire(None, "sparse")
    code = (
        "import os\nfor name, size in [('huge.bin', 200 * 2**20)] + [(f's{i:02}.bin', 2**20) for i in range(20)]:\n"
        "    open(name, 'wb').close()\n    os.truncate(name, size)\n"
    )
    result = await run_ok(session, code)
    assert [(f.name, f.size) for f in result.files] == [(f"s{i:02}.bin", 2**20) for i in range(4)]
    assert any("huge.bin" in note and "limit" in note for note in result.notes)
    assert any(note.startswith("16 more changed files were not returned") for note in result.notes)
    again = await run_ok(session, "import os\nfor n in os.listdir('.'):\n    os.utime(n)")
    assert sum(f.size for f in again.files) == 4 * 2**20  # every cell: at most the total cap


def assert_encodable(result: ExecutionResult) -> None:
    """Every string of the result is strict UTF-8 (a lone surrogate would fail here)."""
    texts = [result.stdout, result.stderr, *result.notes, *(f.name for f in result.files)]
    for item in result.results:
        texts += [*item.data, *item.data.values()]
    if result.error is not None:
        texts += [result.error.name, result.error.value, result.error.traceback]
    for text in texts:
        text.encode("utf-8")


async def test_file_names_that_are_not_text_are_not_returned(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "for name in (b'\\xc3.txt', b'a\\nb.txt', b'back\\\\slash', 'ok-é.txt'.encode()):\n"
        "    open(name, 'w').write('x')",
    )
    assert_encodable(result)
    assert [f.name for f in result.files] == ["ok-é.txt"]
    note = next(n for n in result.notes if "not plain UTF-8" in n)
    assert "'\\\\xc3.txt'" in note and "'a\\nb.txt'" in note


async def test_lone_surrogates_in_reprs_and_errors_are_escaped(session: SandboxSession) -> None:
    result = await session.run(
        "class Odd:\n    def __repr__(self):\n        return 'odd \\udcff'\n"
        "    def _repr_html_(self):\n        return '<b>\\ud800</b>'\n"
        "display(Odd())\nprint('\\udc80')\nraise ValueError('bad \\udfff')",
    )
    assert_encodable(result)
    assert result.results[0].data == {"text/plain": "odd \\udcff", "text/html": "<b>\\ud800</b>"}
    assert result.stdout == "\\udc80\n"
    assert result.error is not None and result.error.value == "bad \\udfff"


async def test_twenty_ten_mib_files_stream_without_growing_the_supervisor(
    make_manager: Callable[..., Awaitable[SandboxManager]],
) -> None:
    # The default memory limit; a total cap that lets all 20 through (200 MiB in one reply).
    manager = await make_manager(
        memory="1g", data_size="256m", max_file_bytes=10 * 2**20, max_total_file_bytes=200 * 2**20
    )
    session, _ = await manager.acquire(None, "big-files")
    result = await run_ok(
        session, "for i in range(20):\n    open(f'f{i:02}.bin', 'wb').write(bytes([i]) * 10 * 2**20)"
    )
    assert [(f.name, f.size) for f in result.files] == [(f"f{i:02}.bin", 10 * 2**20) for i in range(20)]
    assert all(f.data == bytes([i]) * 10 * 2**20 for i, f in enumerate(result.files))
    peak = await run_ok(
        session, "int(next(l for l in open('/proc/1/status') if l.startswith('VmHWM')).split()[1]) // 1024"
    )
    print(f"supervisor peak RSS after streaming 20 x 10 MiB: {peak.results[0].text} MiB")
    assert int(peak.results[0].text or "0") < 100


async def test_the_default_total_cap_bounds_one_cells_files(
    make_manager: Callable[..., Awaitable[SandboxManager]],
) -> None:
    manager = await make_manager(memory="1g", data_size="256m", max_file_bytes=10 * 2**20)
    session, _ = await manager.acquire(None, "total-cap")
    assert manager.config.max_total_file_bytes == 32 * 2**20  # the default
    result = await run_ok(
        session, "for i in range(20):\n    open(f'f{i:02}.bin', 'wb').write(bytes([i]) * 10 * 2**20)"
    )
    assert [f.name for f in result.files] == ["f00.bin", "f01.bin", "f02.bin"]
    assert any(note.startswith("17 more changed files were not returned") for note in result.notes)


async def test_a_malformed_kernel_answer_costs_the_kernel_not_the_session(session: SandboxSession) -> None:
    # Code in the kernel process itself writes on its reply channel: garbage, a line far over
    # what a kernel may answer, an answer that would swell. Each restarts the kernel, not more.
    find = CHANNELS.replace("KINDS", "'socket:'") + "import json, sys\nfd = fds[0]\nx = 1\n"
    # a well-formed answer of raw UTF-8 that would triple in size once \\u-escaped
    swollen = (
        "(json.dumps({'t': 'done', 'n': int(get_ipython().execution_count), 'error': None, "
        "'notes': [], 'results': [{'kind': 'display_data', 'data': {'text/plain': '\\U0001f600' * 2_000_000}}]}, "
        "ensure_ascii=False) + '\\n').encode()"
    )
    for payload in ("b'[[[not json\\n'", "b'[' * (40 * 2**20)", swollen):
        result = await session.run(find + f"os.write(fd, {payload})\nimport time\ntime.sleep(60)", timeout=20)
        assert result.restarted and result.error is not None and result.error.name == "KernelDied"
        assert "malformed" in result.error.value and not result.timed_out
        after = await session.run("x")
        assert after.error is not None and after.error.name == "NameError"
    await assert_usable(session)


class RawAttach:
    """A second client on a sandbox's attach stream that writes raw bytes and reads the replies."""

    def __init__(self, client: docker.DockerClient, container_id: str) -> None:
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        self.sock: socket.socket = client.api.attach_socket(container_id, params=params)._sock
        self.sock.settimeout(60)
        self.lines: dict[int, list[bytes]] = {1: [], 2: []}
        self.partial = {1: b"", 2: b""}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, needle: bytes) -> list[bytes]:
        """stdout lines up to and including the one holding ``needle``."""
        while not any(needle in line for line in self.lines[1]):
            header = self._exact(8)
            stream = header[0]
            self.partial[stream] += self._exact(struct.unpack(">I", header[4:])[0])
            *done, self.partial[stream] = self.partial[stream].split(b"\n")
            self.lines[stream] += done
        return self.lines[1]

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "attach stream closed: the supervisor died"
            data += chunk
        return data


async def test_garbage_on_the_control_channel_never_crashes_the_supervisor(
    make_manager: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient
) -> None:
    manager = await make_manager(max_upload_bytes=1024 * 1024)  # request lines up to ~2.4 MB
    session, _ = await manager.acquire(None, "garbage")
    await run_ok(session, "x = 41")
    raw = await asyncio.to_thread(RawAttach, docker_client, session.id)
    lines = [
        b"this is not json",
        b"\xff\xfe\xc3(invalid utf-8",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 100_000,
        b"[1, 2, 3]",
        b'"a string"',
        b"1" * 5000,
        b'{"id": {"nested": 1}, "op": "ping"}',
        b"x" * (4 * 1024 * 1024),  # over the request bound: dropped without being held
        b'{"id": "bad-op", "op": "format-disk"}',
        b'{"id": "bad-code", "op": "run", "code": 42}',
        b'{"id": "bad-timeout", "op": "run", "code": "1", "timeout": "soon"}',
        b'{"id": "bad-put", "op": "put", "name": "a.txt", "data": "***not base64***"}',
        b'{"id": "bad-name", "op": "put", "name": "\\udcff", "data": ""}',
        b'{"id": "after", "op": "ping"}',
    ]
    await asyncio.to_thread(raw.send, b"\n".join(lines) + b"\n")
    replies = [json.loads(line) for line in await asyncio.to_thread(raw.read_until, b'"after"')]
    by_id = {r["id"]: r for r in replies if "id" in r}
    assert by_id["after"]["ok"] is True
    for rid in ("bad-op", "bad-code", "bad-timeout", "bad-put", "bad-name"):
        assert by_id[rid]["ok"] is False and by_id[rid]["error"], rid
    raw.sock.close()
    assert (await run_ok(session, "x + 1")).results[0].text == "42"  # same session, same kernel


# --- per-session uids ---------------------------------------------------------------------------------

INOTIFY_FILL = (
    "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nheld = []\nwhile True:\n"
    "    fd = libc.inotify_init1(0)\n    if fd < 0:\n        break\n    held.append(fd)\n"
    "(len(held), errno.errorcode[ctypes.get_errno()])"
)
INOTIFY_ONE = (
    "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.inotify_init1(0)\n"
    "'ok' if fd >= 0 else errno.errorcode[ctypes.get_errno()]"
)


async def test_each_session_has_its_own_uid_and_per_uid_limits(manager: SandboxManager) -> None:
    (a, _), (b, _) = await asyncio.gather(manager.acquire(None, "uid-a"), manager.acquire(None, "uid-b"))
    uids = [int((await run_ok(s, "import os\nos.getuid(), os.getgid()")).results[0].text[1:].split(",")[0])
            for s in (a, b)]
    assert uids[0] != uids[1] and all(2**20 <= uid < 2**31 - 1 for uid in uids)
    filled = await run_ok(a, INOTIFY_FILL)  # fs.inotify.max_user_instances is counted per uid
    assert filled.results[0].text is not None and filled.results[0].text.endswith("'EMFILE')")
    assert (await run_ok(b, INOTIFY_ONE)).results[0].text == "'ok'"


async def test_a_pinned_uid_shares_per_uid_limits(make_manager: Callable[..., Awaitable[SandboxManager]]) -> None:
    # The control for the test above: CODELOOP_SANDBOX_USER=uid:gid puts every session on one uid.
    manager = await make_manager(user="1048577:1048577")
    (a, _), (b, _) = await asyncio.gather(manager.acquire(None, "pin-a"), manager.acquire(None, "pin-b"))
    await run_ok(a, INOTIFY_FILL)
    assert (await run_ok(b, INOTIFY_ONE)).results[0].text == "'EMFILE'"


async def test_a_uid_without_a_passwd_entry_runs_the_data_stack(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "import getpass, os, pwd\nimport matplotlib.pyplot as plt\nimport pandas as pd\n"
        "plt.plot(pd.Series([1, 3, 2]))\ntry:\n    pwd.getpwuid(os.getuid())\n    entry = True\n"
        "except KeyError:\n    entry = False\n(getpass.getuser(), os.path.expanduser('~'), entry)",
        timeout=60,  # the first import of matplotlib is slow on a busy machine
    )
    assert result.results[0].text == "('sandbox', '/tmp', False)"
    assert len(result.images) == 1 and result.stderr == ""


async def test_the_largest_reply_stays_within_max_reply_bytes(
    make_manager: Callable[..., Awaitable[SandboxManager]], docker_client: docker.DockerClient
) -> None:
    # Everything at its cap, in the characters that cost most once JSON-escaped (astral ones,
    # lone surrogates): inline output, both full outputs, rich results, the error, the files.
    manager = await make_manager(max_files=3, max_file_bytes=2**20, max_total_file_bytes=4 * 2**20)
    session, _ = await manager.acquire(None, "largest")
    code = (
        "import sys\nprint('\\U0001f600' * 2**19)\nprint('\\udcff' * 2**19, file=sys.stderr)\n"
        "for i in range(3):\n    open(f'f{i}', 'wb').write(b'\\xff' * 2**20)\n"
        "class Big:\n    def __repr__(self):\n        return '\\U0001f600\\udcff' * 10**6\n"
        "    def _repr_html_(self):\n        return '\\U0001f600' * 199_999\n"
        "for _ in range(40):\n    display(Big())\n"
        "raise ValueError('\\udcff\\U0001f600' * 10**6)"
    )
    raw = await asyncio.to_thread(RawAttach, docker_client, session.id)
    request = {"id": "largest", "op": "run", "code": code, "timeout": 60}
    await asyncio.to_thread(raw.send, json.dumps(request).encode() + b"\n")
    line = next(line for line in await asyncio.to_thread(raw.read_until, b'"largest"') if b'"largest"' in line)
    raw.sock.close()
    reply = json.loads(line.decode("utf-8", "strict"))["result"]
    print(f"largest reply: {len(line):,} bytes of at most {manager.config.max_reply_bytes:,}")
    assert len(line) <= manager.config.max_reply_bytes
    assert [f["name"] for f in reply["files"]] == ["stdout.txt", "stderr.txt", "f0", "f1"]  # 4 x 1 MiB
    assert reply["error"]["name"] == "ValueError" and len(reply["results"]) < 40  # results capped


def test_max_reply_bytes_knows_the_kernels_budget() -> None:
    spec = importlib.util.spec_from_file_location("sandbox_kernel", "runner/sandbox/kernel.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, "runner/sandbox")  # the kernel imports its neighbours as the image lays them out
    try:
        kernel = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernel)
    finally:
        sys.path.remove("runner/sandbox")
    assert kernel.RESULTS_BYTES == RESULTS_BYTES
