"""The sandbox's init and main process: a JSON line protocol on stdin/stdout.

The worker talks to it over the container's attach stream (the network is off, so no ports).
It is PID 1 (no docker-init): Linux drops the signals a cell sends it, it is
non-dumpable (no ptrace, no /proc/1/fd for same-uid processes), and it alone holds the attach
stream. It forks the kernel (kernel.py) that holds the user's namespace, drains and caps its
output, enforces the cell timeout (SIGINT, then SIGKILL and a fresh kernel), kills whatever a
cell leaves running once it ends, reports OOM kills and crashes, returns files changed under
/mnt/data (streamed, within a total cap), and exits after the idle TTL so an abandoned session is
reaped even if every worker died (the container is created with auto-remove). A warm-pool
container no thread has taken yet (``--claim-ttl``) lives only while its worker keeps pinging
it: a worker killed with its pool leaves nothing behind for long. Stdlib only, but for building
IPython's shell once before the first fork (kernel.preload).

Requests: {"id", "op": run|put|reset|interrupt|ping, ...}; every reply carries the request's id.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import select
import shutil
import signal
import time
import warnings
from collections import deque
from typing import Any

import procs

procs.set_dumpable(False)  # first: before anything could open /proc/1 (the kernel is forked later)

import kernel as kernel_mod  # noqa: E402
import wire  # noqa: E402
from files import Outgoing, cpu_seconds, oom_kills, scan, snapshot, write_upload  # noqa: E402
from link import KernelLink  # noqa: E402

DATA = "/mnt/data"
MPL_SEED = "/opt/codeloop/mpl"
MAX_QUEUE = 64  # requests waiting for the running cell; more are refused
RESTARTED = (
    "The Python session was restarted: variables and imports from earlier cells are gone "
    "(files in /mnt/data are kept)."
)


class Supervisor:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.queue: deque[dict[str, Any]] = deque()
        self.cell: dict[str, Any] | None = None
        self.n = 0
        self.last_active = time.monotonic()
        #: a pool container is unclaimed until its first request other than a ping
        self.claimed = opts.claim_ttl <= 0
        self.reader = wire.LineReader(opts.max_request_bytes)
        self.kernel = KernelLink(opts.output_chars, opts.max_file_bytes)
        self.seen = snapshot(DATA)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select via the wakeup fd
        self.kernel.spawn()

    def restart(self, clean_tmp: bool = False) -> None:
        """Every process killed, /dev/shm and System V IPC emptied (``clean_tmp``: /tmp too), a
        fresh kernel. /mnt/data is kept."""
        procs.kill_all({})
        self.kernel.drain()  # what the cell wrote before it was killed is still its output
        self.kernel.close()
        procs.empty_dir("/dev/shm")
        procs.remove_ipc()
        if clean_tmp:
            procs.empty_dir("/tmp")
            seed_tmp()
        self.kernel.spawn()

    def collect(self) -> None:
        """Reap every exited child and orphan; note the kernel's status if it died."""
        reaped = procs.reap()
        if self.kernel.pid in reaped:
            self.kernel.status = reaped[self.kernel.pid]

    def send(self, msg: dict[str, Any]) -> None:
        wire.send(msg)

    def log(self, text: str) -> None:
        """A line on stderr: the worker logs the container's stderr (the attach stream's channel 2)."""
        try:
            os.write(2, f"supervisor: {text}\n".encode())
        except OSError:
            pass

    # --- requests ---------------------------------------------------------------------------
    def on_line(self, line: bytes | None) -> None:
        if line is None:
            self.log(f"dropped a request line over {self.opts.max_request_bytes:,} bytes")
            return
        if not line.strip():
            return
        rid, req, problem = wire.parse_request(line)
        if req is not None:
            self.handle(req)
        elif rid is not None:
            self.send({"id": rid, "ok": False, "error": problem})
        else:
            self.log(f"dropped {problem}")

    def handle(self, req: dict[str, Any]) -> None:
        self.last_active = time.monotonic()
        op, rid = req["op"], req["id"]
        if op != "ping":
            self.claimed = True
        if op == "ping":
            self.send(
                {"id": rid, "ok": True, "busy": self.cell is not None, "idle_ttl_s": self.opts.idle_ttl}
            )
        elif op == "interrupt":
            if self.cell is not None and self.cell["interrupted_at"] is None:
                procs.signal_quietly(self.kernel.pid, signal.SIGINT)
                self.cell["interrupted_at"] = time.monotonic()
            self.send({"id": rid, "ok": True, "running": self.cell is not None})
        elif self.cell is not None:
            if len(self.queue) >= MAX_QUEUE:
                self.send({"id": rid, "ok": False, "error": "too many requests waiting for the running cell"})
            else:
                self.queue.append(req)  # one cell at a time; later requests wait their turn
        elif op == "run":
            self.start_cell(req)
        elif op == "put":
            try:
                data = base64.b64decode(req["data"], validate=True)
                name = write_upload(DATA, req["name"], data)
                self.seen = snapshot(DATA)
                self.send({"id": rid, "ok": True, "path": f"{DATA}/{name}"})
            except (OSError, ValueError, binascii.Error) as exc:
                self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        elif op == "reset":
            self.restart(clean_tmp=True)
            self.send({"id": rid, "ok": True})

    def start_cell(self, req: dict[str, Any]) -> None:
        self.n += 1
        self.kernel.new_outputs()
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
            "cpu_before": cpu_seconds(),
        }
        if self.kernel.status is not None:  # died between cells (e.g. a thread of it crashed it)
            self.finish(None, _signal_of(self.kernel.status))
            return
        self.kernel.send_cell(req.get("code", ""), self.n)

    def tick(self) -> None:
        """Timeout handling: SIGINT at the deadline, SIGKILL + a fresh kernel after the grace."""
        cell = self.cell
        if cell is None:
            return
        now = time.monotonic()
        if cell["interrupted_at"] is None and now >= cell["deadline"]:
            cell["timed_out"] = True
            cell["interrupted_at"] = now
            procs.signal_quietly(self.kernel.pid, signal.SIGINT)
        elif cell["interrupted_at"] is not None and now >= cell["interrupted_at"] + self.opts.grace:
            self.restart()
            self.finish(None, signal.SIGKILL, forced=True)

    def finish(self, done: dict[str, Any] | None, sig: int = 0, forced: bool = False) -> None:
        cell, self.cell = self.cell, None
        assert cell is not None
        res: dict[str, Any] = {
            "results": [],
            "error": None,
            "timed_out": cell["timed_out"],
            "oom_killed": False,
            "restarted": False,
        }
        notes: list[str] = []
        problem = None
        if done is not None:
            try:
                if "msg" not in done:
                    raise ValueError(done["malformed"])
                res["results"], res["error"], notes = wire.check_done(
                    done["msg"], cell["n"], self.opts.output_chars, self.kernel.cap * 7 // 6
                )
            except ValueError as exc:
                problem = f"The Python process sent a malformed answer ({exc}) and was restarted."
        if done is not None and problem is None:
            if cell["timed_out"] and res["error"]:
                res["error"]["name"] = "TimeoutError"
                res["error"]["value"] = f"The cell ran longer than {cell['timeout']:g} s and was interrupted."
            reaped: dict[int, int] = {}
            settled = procs.kill_others(self.kernel.pid, reaped)
            if not settled or self.kernel.pid in reaped:
                self.restart()
                res["restarted"] = True
                notes.append(("" if settled else "Processes the cell left running could not be stopped. ") + RESTARTED)
            self.kernel.drain()
        elif problem is not None:
            self.restart()
            res["restarted"] = True
            res["error"] = {"name": "KernelDied", "traceback": "", "value": problem}
            notes.append(RESTARTED)
        else:
            res["restarted"] = True
            if not forced:
                self.restart()
            before, after = cell["oom_before"], oom_kills()
            oom = sig == signal.SIGKILL and not forced and (before is None or (after or 0) > before)
            res["oom_killed"] = oom
            if forced:
                what = "did not stop when interrupted, so the Python process was killed"
                value = f"The cell ran longer than {cell['timeout']:g} s and {what}."
                res["error"] = {"name": "TimeoutError", "traceback": "", "value": value}
            elif oom:
                value = "The cell used more memory than the sandbox allows and was killed."
                res["error"] = {"name": "MemoryError", "traceback": "", "value": value}
            else:
                value = f"The Python process died ({_signal_name(sig)})."
                res["error"] = {"name": "KernelDied", "traceback": "", "value": value}
            notes.append(RESTARTED)
        if self.kernel.foreign:
            notes.append(f"{self.kernel.foreign:,} bytes other processes wrote on the kernel's channel were ignored.")
            self.kernel.foreign = 0
        self.reply(cell, res, notes)
        self.last_active = time.monotonic()

    def reply(self, cell: dict[str, Any], res: dict[str, Any], notes: list[str]) -> None:
        """The run reply, its files streamed straight from memory or /mnt/data into the attach
        stream: the supervisor never holds more than one chunk of them encoded."""
        opts = self.opts
        outputs: list[Outgoing] = []
        used = 0
        res["truncated"] = False
        for name, sink in (("stdout", self.kernel.out), ("stderr", self.kernel.err)):
            res[name], full, note = sink.render(name, opts.output_chars)
            res["truncated"] |= full is not None
            if full is not None and used + full.size > opts.max_total_file_bytes:
                note = f"The {name} was too long to show ({sink.total:,} bytes) and too large to attach."
                full = None
            if full is not None:
                outputs.append(full)
                used += full.size
            if note:
                notes.append(note)
        files, scan_notes, self.seen = scan(
            DATA, self.seen, opts.max_files, opts.max_file_bytes, opts.max_total_file_bytes, used
        )
        notes += scan_notes
        res["duration_s"] = time.monotonic() - cell["start"]
        cpu_after = cpu_seconds()
        if cell["cpu_before"] is not None and cpu_after is not None:
            # the container's cgroup: the cell's processes, and the supervisor's own share (small)
            res["cpu_s"] = round(max(0.0, cpu_after - cell["cpu_before"]), 6)
        wire.send_result(cell["id"], res, outputs + files, notes)

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
            watch, writes = [0, self.wake_r], list[int]()
            if self.cell is not None:
                reads, writes = self.kernel.watched()
                watch += reads
            readable, writable, _ = select.select(watch, writes, [], timeout)
            if self.wake_r in readable:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            self.collect()
            if self.cell is not None:
                self.step(readable, writable)
            if 0 in readable:
                chunk = os.read(0, 1 << 20)
                if not chunk:
                    return  # stdin closed for good: nobody can reach this session any more
                for line in self.reader.feed(chunk):
                    self.on_line(line)

    def step(self, readable: list[int], writable: list[int]) -> None:
        """One turn of the running cell: feed its command, drain its output, finish it if it is done."""
        kernel = self.kernel
        if kernel.fds["cmd"] in writable:
            kernel.push_cmd()
        if kernel.fds["out"] in readable or kernel.fds["err"] in readable:
            kernel.drain()
        if kernel.fds["ctl"] in readable or kernel.status is not None:
            kernel.read_answers()  # a kernel that died may have answered just before
        done = kernel.answer()
        if done is not None:
            self.finish(done)
        elif kernel.status is not None:
            self.finish(None, _signal_of(kernel.status))
        else:
            self.tick()


def _signal_name(sig: int) -> str:
    if not sig:
        return "exit"
    try:
        return signal.Signals(sig).name
    except ValueError:  # a real-time signal without a name
        return f"signal {sig}"


def _signal_of(status: int) -> int:
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def seed_tmp() -> None:
    """The prebuilt matplotlib font cache into MPLCONFIGDIR (/tmp: the root is read-only)."""
    cache = os.environ.get("MPLCONFIGDIR")
    if cache and os.path.isdir(MPL_SEED):
        try:
            shutil.copytree(MPL_SEED, cache, dirs_exist_ok=True)
        except OSError:
            pass


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
    parser.add_argument("--max-request-bytes", type=int, default=48 * 1024 * 1024)
    opts = parser.parse_args()
    # As PID 1, only signals with a handler arrive from inside the container: SIGINT must not be
    # one (Python's default raises KeyboardInterrupt), SIGTERM is honoured only from outside.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
    procs.exit_on_outside_sigterm()
    seed_tmp()
    os.chdir(DATA)
    kernel_mod.preload()
    Supervisor(opts).loop()


if __name__ == "__main__":
    main()
