"""The sandbox's main process (under docker-init): a JSON line protocol on stdin/stdout.

The worker talks to it over the container's attach stream (the network is off, so no ports).
It forks the kernel (kernel.py) that holds the user's namespace, drains and caps its output,
enforces the cell timeout (SIGINT, then SIGKILL and a fresh kernel), reports OOM kills and crashes,
returns files changed under /mnt/data, and exits after the idle TTL so an abandoned session is
reaped even if every worker died (the container is created with auto-remove). A warm-pool
container no thread has taken yet (``--claim-ttl``) lives only while its worker keeps pinging
it: a worker killed with its pool leaves nothing behind for long. Stdlib only.

Requests: {"id", "op": run|put|reset|interrupt|ping, ...}; every reply carries the request's id.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import sys
import time
from collections import deque
from typing import Any

import kernel as kernel_mod
from files import Output, oom_kills, scan, snapshot, write_upload

DATA = "/mnt/data"


class Supervisor:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.queue: deque[dict[str, Any]] = deque()
        self.cell: dict[str, Any] | None = None
        self.kernel_pid = 0
        self.fds: dict[str, int] = {}
        self.n = 0
        self.last_active = time.monotonic()
        #: a pool container is unclaimed until its first request other than a ping
        self.claimed = opts.claim_ttl <= 0
        self.inbuf = bytearray()
        self.ctlbuf = bytearray()
        self.out = Output(opts.max_file_bytes, opts.output_chars)
        self.err = Output(opts.max_file_bytes, opts.output_chars)
        self.seen = snapshot(DATA)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select via the wakeup fd
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        self.spawn()

    # --- kernel lifecycle -------------------------------------------------------------------
    def spawn(self) -> None:
        cmd_r, cmd_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                signal.set_wakeup_fd(-1)
                devnull = os.open("/dev/null", os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                keep = {0, 1, 2, cmd_r, ctl_w}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        try:
                            os.close(int(name))
                        except OSError:
                            pass
                kernel_mod.serve(cmd_r, ctl_w, self.opts.output_chars)
            finally:
                os._exit(1)
        for fd in (cmd_r, ctl_w, out_w, err_w):
            os.close(fd)
        for fd in (ctl_r, out_r, err_r):
            os.set_blocking(fd, False)
        self.kernel_pid = pid
        self.fds = {"cmd": cmd_w, "ctl": ctl_r, "out": out_r, "err": err_r}
        self.ctlbuf.clear()

    def kill_all(self) -> None:
        """Kill every process but init and us: the kernel and anything it forked or left behind."""
        me = os.getpid()
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in (1, me):
                try:
                    os.kill(int(name), signal.SIGKILL)
                except OSError:
                    pass
        self.reap(block=True)

    def reap(self, block: bool = False) -> int | None:
        """Reap children; return the kernel's wait status if it died."""
        status = None
        if block and self.kernel_pid:
            try:
                _, status = os.waitpid(self.kernel_pid, 0)
            except ChildProcessError:
                status = 0
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.kernel_pid:
                status = st
        return status

    def restart(self) -> None:
        self.kill_all()
        self.drain()
        for fd in self.fds.values():
            os.close(fd)
        self.spawn()

    # --- I/O --------------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        data = memoryview((json.dumps(msg) + "\n").encode())
        while data:
            data = data[os.write(1, data) :]

    def drain(self) -> None:
        for key, sink in (("out", self.out), ("err", self.err)):
            while True:
                try:
                    chunk = os.read(self.fds[key], 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                sink.add(chunk)

    def read_ctl(self) -> dict[str, Any] | None:
        try:
            chunk = os.read(self.fds["ctl"], 1 << 20)
        except BlockingIOError:
            return None
        self.ctlbuf += chunk
        while b"\n" in self.ctlbuf:
            line, _, rest = bytes(self.ctlbuf).partition(b"\n")
            self.ctlbuf[:] = rest
            msg: dict[str, Any] = json.loads(line)
            # Anything the cell forked could write here too; only the kernel's answer counts.
            if self.cell and msg.get("pid") == self.kernel_pid and msg.get("n") == self.cell["n"]:
                return msg
        return None

    # --- requests ---------------------------------------------------------------------------
    def handle(self, req: dict[str, Any]) -> None:
        self.last_active = time.monotonic()
        op, rid = req.get("op"), req.get("id")
        if op != "ping":
            self.claimed = True
        if op == "ping":
            self.send(
                {"id": rid, "ok": True, "busy": self.cell is not None, "idle_ttl_s": self.opts.idle_ttl}
            )
        elif op == "interrupt":
            if self.cell is not None and self.cell["interrupted_at"] is None:
                os.kill(self.kernel_pid, signal.SIGINT)
                self.cell["interrupted_at"] = time.monotonic()
            self.send({"id": rid, "ok": True, "running": self.cell is not None})
        elif self.cell is not None:
            self.queue.append(req)  # one cell at a time; later requests wait their turn
        elif op == "run":
            self.start_cell(req)
        elif op == "put":
            try:
                name = write_upload(DATA, req["name"], base64.b64decode(req["data"]))
                self.seen = snapshot(DATA)
                self.send({"id": rid, "ok": True, "path": f"{DATA}/{name}"})
            except (OSError, ValueError) as exc:
                self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        elif op == "reset":
            self.restart()
            self.send({"id": rid, "ok": True})
        else:
            self.send({"id": rid, "ok": False, "error": f"unknown op {op!r}"})

    def start_cell(self, req: dict[str, Any]) -> None:
        self.n += 1
        self.out = Output(self.opts.max_file_bytes, self.opts.output_chars)
        self.err = Output(self.opts.max_file_bytes, self.opts.output_chars)
        timeout = float(req.get("timeout") or self.opts.timeout)
        now = time.monotonic()
        self.cell = {
            "id": req["id"],
            "n": self.n,
            "start": now,
            "deadline": now + timeout,
            "timeout": timeout,
            "interrupted_at": None,
            "timed_out": False,
            "oom_before": oom_kills(),
        }
        line = (json.dumps({"code": req.get("code", ""), "n": self.n}) + "\n").encode()
        try:
            os.write(self.fds["cmd"], line)  # blocking: the kernel reads it at once
        except BrokenPipeError:  # the kernel died between cells; finish() restarts it
            self.finish(None, 0)

    def tick(self) -> None:
        """Timeout handling: SIGINT at the deadline, SIGKILL + a fresh kernel after the grace."""
        cell = self.cell
        if cell is None:
            return
        now = time.monotonic()
        if cell["interrupted_at"] is None and now >= cell["deadline"]:
            cell["timed_out"] = True
            cell["interrupted_at"] = now
            os.kill(self.kernel_pid, signal.SIGINT)
        elif cell["interrupted_at"] is not None and now >= cell["interrupted_at"] + self.opts.grace:
            self.restart()
            self.finish(None, signal.SIGKILL, forced=True)

    def finish(self, done: dict[str, Any] | None, sig: int = 0, forced: bool = False) -> None:
        cell, self.cell = self.cell, None
        assert cell is not None
        self.drain()
        res: dict[str, Any] = {
            "results": [],
            "error": None,
            "notes": [],
            "files": [],
            "timed_out": cell["timed_out"],
            "oom_killed": False,
            "restarted": False,
        }
        if done is not None:
            res["results"], res["error"] = done["results"], done["error"]
            if cell["timed_out"] and res["error"]:
                res["error"]["name"] = "TimeoutError"
                res["error"]["value"] = f"The cell ran longer than {cell['timeout']:g} s and was interrupted."
        else:
            res["restarted"] = True
            if not forced:
                self.restart()
            before, after = cell["oom_before"], oom_kills()
            oom = sig == signal.SIGKILL and not forced and (before is None or (after or 0) > before)
            res["oom_killed"] = oom
            if forced:
                what = "did not stop when interrupted, so the Python process was killed"
                res["error"] = {
                    "name": "TimeoutError",
                    "traceback": "",
                    "value": f"The cell ran longer than {cell['timeout']:g} s and {what}.",
                }
            elif oom:
                res["error"] = {
                    "name": "MemoryError",
                    "traceback": "",
                    "value": "The cell used more memory than the sandbox allows and was killed.",
                }
            else:
                name = signal.Signals(sig).name if sig else "exit"
                res["error"] = {
                    "name": "KernelDied",
                    "traceback": "",
                    "value": f"The Python process died ({name}).",
                }
            res["notes"].append(
                "The Python session was restarted: variables and imports from earlier "
                "cells are gone (files in /mnt/data are kept)."
            )
        res["stdout"], out_file, out_note = self.out.render("stdout", self.opts.output_chars)
        res["stderr"], err_file, err_note = self.err.render("stderr", self.opts.output_chars)
        res["truncated"] = bool(out_file or err_file)
        res["files"] = [f for f in (out_file, err_file) if f]
        res["notes"] += [n for n in (out_note, err_note) if n]
        files, notes, self.seen = scan(DATA, self.seen, self.opts.max_files, self.opts.max_file_bytes)
        res["files"] += files
        res["notes"] += notes
        res["duration_s"] = time.monotonic() - cell["start"]
        self.send({"id": cell["id"], "ok": True, "result": res})
        self.last_active = time.monotonic()

    # --- main loop --------------------------------------------------------------------------
    def loop(self) -> None:
        self.send({"event": "ready", "pid": os.getpid()})
        while True:
            while self.cell is None and self.queue:
                self.handle(self.queue.popleft())
            if self.cell is None:
                ttl = self.opts.idle_ttl if self.claimed else self.opts.claim_ttl
                timeout = max(0.0, self.last_active + ttl - time.monotonic())
                if timeout == 0.0:
                    return  # idle (or unclaimed) TTL: exiting ends the container, which removes itself
            else:
                base = self.cell["interrupted_at"]
                due = self.cell["deadline"] if base is None else base + self.opts.grace
                timeout = max(0.0, due - time.monotonic())
            watch = [0, self.wake_r]
            if self.cell is not None:
                watch += [self.fds["ctl"], self.fds["out"], self.fds["err"]]
            readable, _, _ = select.select(watch, [], [], timeout)
            if self.wake_r in readable:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.cell is not None:
                if self.fds["out"] in readable or self.fds["err"] in readable:
                    self.drain()
                if self.fds["ctl"] in readable and (done := self.read_ctl()) is not None:
                    self.finish(done)
                elif (status := self.reap()) is not None and self.cell is not None:
                    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                    self.finish(None, sig)
                else:
                    self.tick()
            if 0 in readable:
                chunk = os.read(0, 1 << 20)
                if not chunk:
                    return  # stdin closed for good: nobody can reach this session any more
                self.inbuf += chunk
                while b"\n" in self.inbuf:
                    line, _, rest = bytes(self.inbuf).partition(b"\n")
                    self.inbuf[:] = rest
                    if line.strip():
                        self.handle(json.loads(line))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-ttl", type=float, default=1800.0)
    parser.add_argument("--claim-ttl", type=float, default=0.0, help="pool container: exit unpinged this long")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--output-chars", type=int, default=20_000)
    parser.add_argument("--max-files", type=int, default=20)
    parser.add_argument("--max-file-bytes", type=int, default=10 * 1024 * 1024)
    parser.add_argument("--max-total-file-bytes", type=int, default=32 * 1024 * 1024)
    opts = parser.parse_args()
    cache, seed = os.environ.get("MPLCONFIGDIR"), "/opt/codeloop/mpl"
    if cache and os.path.isdir(seed):
        shutil.copytree(seed, cache, dirs_exist_ok=True)  # prebuilt font cache; the root is read-only
    os.chdir(DATA)
    Supervisor(opts).loop()


if __name__ == "__main__":
    main()
