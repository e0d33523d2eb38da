"""The supervisor's side of one kernel process (runs inside the sandbox; stdlib only): fork it, feed
it commands, drain its output, and read its answer on a socket that names each writer.

The kernel answers on a Unix socket with SO_PASSCRED: every read carries the pid Linux saw write
it, which no process can choose (claiming another in SCM_CREDENTIALS needs CAP_SYS_ADMIN). A
child the cell forked inherits the socket, but its bytes are dropped and counted, never parsed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
from typing import Any

import kernel as kernel_mod
from files import Output


class KernelLink:
    def __init__(self, output_chars: int, max_file_bytes: int) -> None:
        self.output_chars, self.max_file_bytes = output_chars, max_file_bytes
        #: the answer as read; the supervisor re-sends it in at most 7/6 of this (max_reply_bytes)
        self.cap = kernel_mod.RESULTS_BYTES + 48 * output_chars + (1 << 20)
        self.pid = 0
        self.status: int | None = None  # the kernel's wait status once it died
        self.fds: dict[str, int] = {}
        self.ctl: socket.socket | None = None
        self.eof: set[int] = set()
        self.cmd_out = bytearray()
        self.answer_buf = bytearray()
        self.foreign = 0  # bytes other processes wrote on the answer socket, dropped
        self.new_outputs()

    def new_outputs(self) -> None:
        self.out = Output(self.max_file_bytes, self.output_chars)
        self.err = Output(self.max_file_bytes, self.output_chars)

    def spawn(self) -> None:
        cmd_r, cmd_w = os.pipe()
        ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                signal.set_wakeup_fd(-1)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                devnull = os.open("/dev/null", os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                keep = {0, 1, 2, cmd_r, ctl_child.fileno()}
                for name in os.listdir("/proc/self/fd"):  # the attach stream (0-2) is gone above
                    if int(name) not in keep:
                        try:
                            os.close(int(name))
                        except OSError:
                            pass
                kernel_mod.serve(cmd_r, ctl_child.fileno(), self.output_chars)
            finally:
                os._exit(1)
        ctl_child.close()
        for fd in (cmd_r, out_w, err_w):
            os.close(fd)
        for fd in (cmd_w, out_r, err_r):
            os.set_blocking(fd, False)
        ctl.setblocking(False)
        self.pid, self.status, self.ctl = pid, None, ctl
        self.fds = {"cmd": cmd_w, "ctl": ctl.fileno(), "out": out_r, "err": err_r}
        self.eof.clear()
        self.answer_buf.clear()
        self.cmd_out.clear()

    def close(self) -> None:
        """Close this side of a kernel that is gone (after drain())."""
        for key, fd in self.fds.items():
            if key != "ctl":
                os.close(fd)
        if self.ctl is not None:
            self.ctl.close()
        self.fds, self.ctl = {}, None

    def watched(self) -> tuple[list[int], list[int]]:
        """(fds to read, fds to write) while a cell runs."""
        reads = [fd for key, fd in self.fds.items() if key != "cmd" and fd not in self.eof]
        return reads, [self.fds["cmd"]] if self.cmd_out else []

    def send_cell(self, code: str, n: int) -> None:
        self.read_answers()  # anything the kernel wrote between cells is stale
        self.answer_buf.clear()
        self.cmd_out += (json.dumps({"code": code, "n": n}) + "\n").encode()
        self.push_cmd()

    def push_cmd(self) -> None:
        """Non-blocking: a kernel that stops reading (stopped, wedged) never blocks the supervisor."""
        try:
            written = os.write(self.fds["cmd"], self.cmd_out)
        except BlockingIOError:
            return
        except BrokenPipeError:  # the kernel died or closed its end; the reaper or the timeout ends the cell
            self.cmd_out.clear()
            return
        del self.cmd_out[:written]

    def drain(self) -> None:
        for key, sink in (("out", self.out), ("err", self.err)):
            fd = self.fds[key]
            for _ in range(64):  # a pipe holds little: more means a writer keeps up; come back later
                if fd in self.eof:
                    break
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    self.eof.add(fd)
                sink.add(chunk)

    def read_answers(self) -> None:
        """Read the answer socket: the kernel's bytes are kept (up to ``cap``), others dropped."""
        assert self.ctl is not None
        for _ in range(64):
            if len(self.answer_buf) > self.cap or self.fds["ctl"] in self.eof:
                return
            try:
                data, anc, _, _ = self.ctl.recvmsg(1 << 20, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            if not data:
                self.eof.add(self.fds["ctl"])
                return
            pid = next(
                (
                    struct.unpack("i", cdata[:4])[0]
                    for level, kind, cdata in anc
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            if pid == self.pid:
                self.answer_buf += data
            else:
                self.foreign += len(data)

    def answer(self) -> dict[str, Any] | None:
        """{"msg": the parsed answer} once a line is in, {"malformed": …} for a line that is not
        JSON or one over ``cap``; None while it is incomplete."""
        end = self.answer_buf.find(b"\n")
        if end < 0:
            return {"malformed": "oversized"} if len(self.answer_buf) > self.cap else None
        line = bytes(self.answer_buf[:end])
        del self.answer_buf[: end + 1]
        try:
            return {"msg": json.loads(line)}
        except (ValueError, RecursionError):
            return {"malformed": "not JSON"}
