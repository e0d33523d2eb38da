"""The shipped seccomp profile (runner/seccomp.json), attacked from inside a real sandbox.

Docker's default profile lets a cell open AF_VSOCK sockets (the hypervisor's host side on a VM)
and set up io_uring rings; codeloop's does not, and a cell cannot go around the socket rule
through the i386 ABI. Ordinary work (numpy, threads, subprocesses, loopback sockets) still runs.
"""

from __future__ import annotations

import json

import docker
import pytest

from runner.hardening import PROFILE_PATH, seccomp_profile, security_opt
from runner.session import SandboxSession
from tests.runner.helpers import literal, run_ok

pytestmark = pytest.mark.docker

#: machine code run from a MAP_32BIT page: `int 0x80` with eax, ebx, ecx, edx set, eax returned
INT80 = r'''
import ctypes, mmap, struct, sys
page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,  # MAP_32BIT
                 prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
base = ctypes.addressof(ctypes.c_char.from_buffer(page))
page.seek(2048); page.write(struct.pack("<III", 40, 1, 0))  # socketcall's args: AF_VSOCK, STREAM, 0
def int80(nr, a, b, c):
    page.seek(0)
    page.write(b"\x53\xb8" + struct.pack("<I", nr) + b"\xbb" + struct.pack("<I", a) + b"\xb9"
               + struct.pack("<I", b) + b"\xba" + struct.pack("<I", c) + b"\xcd\x80\x5b\xc3")
    return ctypes.CFUNCTYPE(ctypes.c_int)(base)()
print("socketcall", int80(102, 1, base + 2048, 0), flush=True)  # SYS_SOCKET through the multiplexer
print("socket", int80(359, 40, 1, 0), flush=True)
'''


def test_the_profile_is_dockers_default_minus_vsock_io_uring_and_32_bit_abis() -> None:
    profile = seccomp_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    assert not allowed & {"io_uring_setup", "io_uring_enter", "io_uring_register", "socketcall"}
    assert {"read", "clone", "mmap", "socketpair", "connect", "accept4"} <= allowed
    socket_rules = [rule for rule in profile["syscalls"] if "socket" in rule["names"]]
    assert socket_rules == [
        {**socket_rules[0], "names": ["socket"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 40, "valueTwo": 0, "op": "SCMP_CMP_NE"}]}
    ]
    x86 = next(a for a in profile["archMap"] if a["architecture"] == "SCMP_ARCH_X86_64")
    assert x86["subArchitectures"] == []
    opts = security_opt()
    assert opts[0] == "no-new-privileges" and json.loads(opts[1].removeprefix("seccomp=")) == profile
    assert "\n" not in opts[1] and len(opts[1]) < 16 * 1024
    assert PROFILE_PATH.name == "seccomp.json"


async def test_sandbox_is_created_with_the_shipped_profile(
    session: SandboxSession, docker_client: docker.DockerClient
) -> None:
    host = docker_client.containers.get(session.id).attrs["HostConfig"]
    assert host["SecurityOpt"] == security_opt()


async def test_vsock_sockets_are_refused(session: SandboxSession) -> None:
    result = await run_ok(session, """
import errno, socket
out = []
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
    try:
        socket.socket(40, kind).close()  # AF_VSOCK
        out.append("opened")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
out
""")
    assert result.results[0].text == "['EPERM', 'EPERM', 'EPERM']"


async def test_io_uring_is_refused(session: SandboxSession) -> None:
    result = await run_ok(session, """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params
out = []
for nr, args in ((425, (8, params)), (426, (0, 1, 0, 0, None, 0)), (427, (0, 0, None, 0))):
    ctypes.set_errno(0)
    rc = libc.syscall(nr, *args)  # io_uring_setup / _enter / _register
    out.append(errno.errorcode.get(ctypes.get_errno(), rc) if rc < 0 else "allowed")
out
""")
    assert result.results[0].text == "['EPERM', 'EPERM', 'EPERM']"


async def test_the_i386_abi_cannot_go_around_the_socket_rule(session: SandboxSession) -> None:
    """On i386, libseccomp would turn the AF_VSOCK rule into an open socketcall(SYS_SOCKET):
    a 32-bit syscall kills its process (SIGSYS = 31) before it can open anything."""
    result = await run_ok(session, f"""
import subprocess, sys
proc = subprocess.run([sys.executable, "-c", {INT80!r}], capture_output=True, text=True)
(proc.returncode, proc.stdout)
""")
    assert result.results[0].text == "(-31, '')"


async def test_ordinary_work_still_runs(session: SandboxSession) -> None:
    result = await run_ok(session, """
import os, socket, subprocess, sys, threading
import numpy as np
out = {"numpy": int(np.arange(10).sum())}
box = []
threads = [threading.Thread(target=box.append, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
out["threads"] = len(box)
out["subprocess"] = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout
server = socket.socket()
server.bind(("127.0.0.1", 0)); server.listen()
client = socket.create_connection(server.getsockname()); conn, _ = server.accept()
client.sendall(b"hi"); out["tcp"] = conn.recv(2).decode()
a, b = socket.socketpair(); a.sendall(b"up"); out["unix"] = b.recv(2).decode()
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
out
""")
    assert literal(result.results[0].text) == literal(
        "{'numpy': 45, 'threads': 8, 'subprocess': '42\\n', 'tcp': 'hi', 'unix': 'up', 'fork': 7}"
    )
