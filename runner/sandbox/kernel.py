"""The kernel: runs cells in one persistent namespace, like a minimal IPython kernel.

Runs inside the sandbox, forked by supervisor.py; stdlib only (numpy/pandas/matplotlib are used
only if the user's code imported them). It reads one JSON command per line from ``cmd_fd`` and
answers one JSON line on ``ctl_fd``, a Unix socket on which the supervisor learns each writer's
pid from the kernel (SCM_CREDENTIALS): a process the cell forked cannot answer for it.
stdout/stderr are pipes the supervisor drains and caps, so a flood never blocks here and output
of subprocesses is captured too.
"""

from __future__ import annotations

import ast
import base64
import faulthandler
import io
import json
import linecache
import os
import re
import signal
import sys
import traceback
import warnings
from typing import Any

import procs

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
THIS_FILE = __file__
MIME_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_json_", "application/json"),
)
RICH_CAP = 200_000  # a single text/html or JSON repr beyond this is dropped (text/plain stays)
#: the rich results of one cell together (JSON bytes); later ones are dropped with a note. The
#: supervisor refuses a reply much larger than this (see its MAX_CTL_BYTES).
RESULTS_BYTES = 8 * 1024 * 1024


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters omitted] ...\n{text[-half:]}"


class Kernel:
    def __init__(self, ctl_fd: int, output_chars: int) -> None:
        self.ctl_fd = ctl_fd
        self.output_chars = output_chars
        self.results: list[dict[str, Any]] = []
        self.results_bytes = 0
        self.dropped = 0
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.ns["display"] = self.display

    # --- rich output ------------------------------------------------------------------------
    def bundle(self, obj: Any) -> dict[str, str]:
        try:
            text = repr(obj)
        except Exception as exc:  # a broken __repr__ must not lose the rest of the cell's output
            text = f"<unrepresentable {type(obj).__name__}: {exc!r}>"
        data = {"text/plain": _cap(text, self.output_chars)}
        for method, mime in MIME_METHODS:
            try:
                fn = getattr(obj, method, None)
                value = fn() if callable(fn) else None
            except Exception:
                continue
            if isinstance(value, tuple):  # IPython allows (data, metadata)
                value = value[0]
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode()
            elif isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            if isinstance(value, str) and len(value) <= RICH_CAP:
                data[mime] = value
        savefig = getattr(obj, "savefig", None)
        if callable(savefig) and type(obj).__name__ == "Figure" and "image/png" not in data:
            buf = io.BytesIO()
            savefig(buf, format="png", bbox_inches="tight")
            data["image/png"] = base64.b64encode(buf.getvalue()).decode()
        return data

    def display(self, *objs: Any) -> None:
        """IPython's display(): each object becomes a display_data result of this cell."""
        for obj in objs:
            self.add_result("display_data", self.bundle(obj))

    def add_result(self, kind: str, data: dict[str, str]) -> None:
        size = len(json.dumps(data))
        if self.results_bytes + size > RESULTS_BYTES:
            self.dropped += 1
            return
        self.results_bytes += size
        self.results.append({"kind": kind, "data": data})

    def collect_figures(self) -> None:
        # Figures left open by the cell are its plots (no plt.show() needed, as in Jupyter).
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            for num in plt.get_fignums():
                self.display(plt.figure(num))
        finally:
            plt.close("all")

    # --- errors -----------------------------------------------------------------------------
    def error_info(self, exc: BaseException) -> dict[str, str]:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == THIS_FILE:
            tb = tb.tb_next  # the user needs their own frames, not the executor's
        lines = traceback.format_exception(type(exc), exc, tb)
        return {
            "name": type(exc).__name__,
            "value": ANSI.sub("", _cap(str(exc), self.output_chars)),
            "traceback": ANSI.sub("", _cap("".join(lines), self.output_chars)),
        }

    # --- cells ------------------------------------------------------------------------------
    def run_cell(self, code: str, n: int) -> dict[str, Any]:
        filename = f"<cell-{n}>"
        # Registered so tracebacks and inspect.getsource show the cell's own lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self.results, self.results_bytes, self.dropped = [], 0, 0
        error = None
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the cell's subprocesses report to it as usual
        try:
            tree = ast.parse(code, filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                exec(compile(tree, filename, "exec"), self.ns)
                if last is not None:
                    value = eval(compile(last, filename, "eval"), self.ns)
                    if value is not None:
                        self.ns["_"] = value
                        self.add_result("execute_result", self.bundle(value))
            finally:
                # Between cells an interrupt must not hit the executor's own code.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the cell's errors too
            error = self.error_info(exc)
        try:
            self.collect_figures()
        except Exception as exc:
            error = error or self.error_info(exc)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        forget_children()
        notes = []
        if self.dropped:
            notes.append(
                f"{self.dropped} more displayed results were dropped: one cell shows at most "
                f"{RESULTS_BYTES // 2**20} MiB of rich output."
            )
        return {"t": "done", "n": n, "results": self.results, "error": error, "notes": notes}

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.ctl_fd, view) :]


def forget_children() -> None:
    """At the end of a cell: the supervisor kills whatever the cell left running once this reply is
    sent; with SIGCHLD ignored those children vanish when they die instead of staying zombies that
    hold pid slots, and the ones already dead are reaped here."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(cmd_fd: int, ctl_fd: int, output_chars: int) -> None:
    """Entry point in the forked child; never returns."""
    me = os.getpid()
    # The supervisor is non-dumpable (fork keeps that); the kernel is an ordinary process again,
    # so /proc/self stays the cell's own (oom_score_adj below, /proc/self/fd, ...).
    procs.set_dumpable(True)
    for name in ("SIGTERM", "SIGPIPE"):
        signal.signal(getattr(signal, name), signal.SIG_DFL if name != "SIGPIPE" else signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Raising our own OOM score needs no privilege: the memory limit then kills the cell's
        # process, never the supervisor, so the session survives a memory bomb.
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.argv = [""]
    faulthandler.enable(file=sys.stderr)
    warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")
    kernel = Kernel(ctl_fd, output_chars)
    with open(cmd_fd, "rb", closefd=False) as commands:
        for line in commands:
            req = json.loads(line)
            reply = kernel.run_cell(req["code"], req["n"])
            if os.getpid() != me:
                os._exit(0)  # a fork() inside the cell returned here: only the kernel may answer
            kernel.send(reply)
    os._exit(0)
