"""The kernel: runs cells through IPython's ``InteractiveShell`` in one persistent namespace.

Runs inside the sandbox, forked by supervisor.py. IPython gives what a Jupyter kernel gives its
users (last-expression display, ``display()`` and rich reprs, magics, ``!cmd``, ``%pip``, top-level
``await``, Jupyter-format tracebacks); this module only routes its output: the display hook and
publisher add rich results to the cell's answer, tracebacks become the answer's error (ANSI
stripped, capped). It reads one JSON command per line from ``cmd_fd`` and answers one JSON line on
``ctl_fd``, a Unix socket on which the supervisor learns each writer's pid from the kernel
(SCM_CREDENTIALS): a process the cell forked cannot answer for it. stdout/stderr are pipes the
supervisor drains and caps, so a flood never blocks here and output of subprocesses (``!cmd``
included) is captured too. The supervisor builds the shell once before forking (``preload``), so
a kernel starts in milliseconds.
"""

from __future__ import annotations

import base64
import faulthandler
import io
import json
import os
import re
import signal
import site
import sys
import warnings
from typing import Any

import procs

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
RICH_CAP = 200_000  # a single text/html or JSON repr beyond this is dropped (text/plain stays)
#: the rich results of one cell together (JSON bytes); later ones are dropped with a note. The
#: supervisor refuses a reply much larger than this (see its MAX_CTL_BYTES).
RESULTS_BYTES = 8 * 1024 * 1024
#: where %pip / !pip find packages: the operator's wheelhouse, mounted read-only (never an index)
WHEELHOUSE = "/opt/wheelhouse"
PIP_INSTALL = re.compile(r"(?:^|[\s/])pip3?(?:\.\d+)?\s+install\s+(?P<args>.*)$", re.S)


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
        self.error: dict[str, str] | None = None
        global CURRENT
        CURRENT = self
        self.shell = SHELL if SHELL is not None else make_shell()

    # --- rich output ------------------------------------------------------------------------
    def bundle(self, format_dict: dict[str, Any], obj: Any = None) -> dict[str, str]:
        """IPython's format data as JSON-able strings, each within its cap (bytes as base64)."""
        data: dict[str, str] = {}
        for mime, value in format_dict.items():
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode()
            elif isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            if not isinstance(value, str):
                continue
            if mime == "text/plain":
                data[mime] = _cap(value, self.output_chars)
            elif len(value) <= RICH_CAP or mime.startswith("image/"):
                data[mime] = value
        savefig = getattr(obj, "savefig", None)
        if callable(savefig) and type(obj).__name__ == "Figure" and "image/png" not in data:
            buf = io.BytesIO()
            savefig(buf, format="png", bbox_inches="tight")
            data["image/png"] = base64.b64encode(buf.getvalue()).decode()
        return data

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
                fig = plt.figure(num)
                self.add_result("display_data", self.bundle({"text/plain": repr(fig)}, fig))
        finally:
            plt.close("all")

    # --- errors -----------------------------------------------------------------------------
    def set_error(self, name: str, value: str, lines: list[str]) -> None:
        """IPython's structured traceback (Jupyter's format: ``Cell In[n], line k`` and the
        arrowed source lines), ANSI stripped and capped head + tail."""
        self.error = {
            "name": name,
            "value": ANSI.sub("", _cap(value, self.output_chars)),
            "traceback": _cap(ANSI.sub("", "\n".join(lines)), self.output_chars),
        }

    # --- cells ------------------------------------------------------------------------------
    def run_cell(self, code: str, n: int) -> dict[str, Any]:
        self.results, self.results_bytes, self.dropped, self.error = [], 0, 0, None
        shell = self.shell
        shell.execution_count = n  # tracebacks say Cell In[n], the supervisor's cell number
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the cell's subprocesses report to it as usual
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                shell.run_cell(code, store_history=True)
            finally:
                # Between cells an interrupt must not hit the executor's own code.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        except BaseException as exc:  # an interrupt that landed in IPython's own bookkeeping
            if self.error is None:
                self.set_error(type(exc).__name__, str(exc), [f"{type(exc).__name__}: {exc}"])
        try:
            self.collect_figures()
        except Exception as exc:
            if self.error is None:
                self.set_error(type(exc).__name__, str(exc), [f"{type(exc).__name__}: {exc}"])
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
        return {"t": "done", "n": n, "results": self.results, "error": self.error, "notes": notes}

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.ctl_fd, view) :]


#: the kernel of this process (set when it starts; the shell's hooks report to it)
CURRENT: Kernel | None = None
#: the shell the supervisor builds once before forking (``preload``); each kernel gets it copied
SHELL: Any = None


def preload() -> None:
    """Build IPython's shell before the kernel is forked (the supervisor calls this once at start):
    every kernel, the first and each after a reset or a crash, is then a fork with a pristine shell
    and empty namespace, ready in milliseconds instead of importing IPython and building a shell
    anew (~50 ms: HumanEval-style reset-per-task work would pay it each time). The supervisor only
    builds it: no cell code runs there, its namespace is never used there, and the shell's hooks
    report to ``CURRENT``, which exists only in a kernel."""
    global SHELL
    import bdb  # noqa: F401  (imported by a shell's first cell otherwise)
    import hashlib  # noqa: F401

    import IPython.core.logger  # noqa: F401

    SHELL = make_shell()
    SHELL.transform_cell("x = 1\n")  # tokenizer regexes compiled once, here (pure text work)


def _current() -> Kernel:
    assert CURRENT is not None, "the shell's hooks run in a kernel only"
    return CURRENT


def make_shell() -> Any:
    """An ``InteractiveShell`` whose display hook, display publisher and traceback printer feed
    the current kernel instead of printing; history in memory (the root is read-only)."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    class Hook(DisplayHook):  # the last expression's value: an execute_result
        value: Any = None

        def write_output_prompt(self) -> None:
            pass

        def compute_format_data(self, result: Any) -> Any:
            self.value = result
            return super().compute_format_data(result)

        def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
            value, self.value = self.value, None
            kernel = _current()
            kernel.add_result("execute_result", kernel.bundle(format_dict, value))

        def finish_displayhook(self) -> None:
            pass

    class Publisher(DisplayPublisher):  # display(): a display_data result
        def publish(self, data: dict[str, Any], metadata: Any = None, *args: Any, **kwargs: Any) -> None:
            kernel = _current()
            kernel.add_result("display_data", kernel.bundle(data))

        def clear_output(self, wait: bool = False) -> None:
            pass

    class Shell(InteractiveShell):
        displayhook_class = Type(Hook)
        display_pub_class = Type(Publisher)

        def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
            try:
                value = str(evalue)
            except Exception as exc:
                value = f"<unprintable {etype.__name__}: {exc!r}>"
            _current().set_error(getattr(etype, "__name__", str(etype)), value, list(stb))

        def system(self, cmd: str) -> None:  # `!cmd`: straight onto the cell's stdout/stderr pipes
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self.system_raw(cmd)
            install = PIP_INSTALL.search(cmd)
            if install and self.user_ns.get("_exit_code"):
                missing_packages(install["args"])


    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    config.InteractiveShell.xmode = "Context"
    config.InteractiveShell.autocall = 0
    config.InteractiveShell.automagic = True
    shell = Shell.instance(config=config)
    # only the MIME types a reply carries (wire.MIMES): no time spent on reprs that would be dropped
    import wire

    shell.display_formatter.active_types = [
        m for m in shell.display_formatter.format_types if m in wire.MIMES
    ]
    shell.user_ns.setdefault("display", __import__("IPython.display", fromlist=["display"]).display)
    return shell


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_packages() -> dict[str, str]:
    """Canonical name -> project name of every wheel in the wheelhouse (empty when there is none)."""
    try:
        names = os.listdir(WHEELHOUSE)
    except OSError:
        return {}
    found = {}
    for name in names:
        if name.endswith(".whl"):
            project = name.split("-", 1)[0]
            found[_canonical(project)] = project.replace("_", "-")
    return found


def missing_packages(args: str) -> None:
    """After a failed pip install: one line per requested package the wheelhouse lacks, naming what
    it has, so the model can pick another way instead of retrying."""
    available = wheelhouse_packages()
    wanted = [a for a in args.split() if not a.startswith("-") and not a.startswith(("/", "."))]
    have = ", ".join(sorted(available.values())) or "nothing (no wheelhouse is configured)"
    for spec in wanted:
        name = re.split(r"[\[<>=!~;@ ]", spec, maxsplit=1)[0]
        if name and _canonical(name) not in available:
            print(
                f"{name} is not available in this deployment (no internet; packages come from the operator's "
                f"wheelhouse); available: {have}. The preinstalled packages can be imported directly.",
                file=sys.stderr,
                flush=True,
            )


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
    try:  # %pip / !pip install into the session's own site directory (PYTHONUSERBASE, in /tmp),
        # which exists from the start so a package is importable as soon as it is installed
        user_site = site.getusersitepackages()
        os.makedirs(user_site, exist_ok=True)
        if user_site not in sys.path:
            sys.path.append(user_site)
    except OSError:
        pass
    kernel = Kernel(ctl_fd, output_chars)
    try:  # IPython's profile folder (IPYTHONDIR, in /tmp, which a reset empties)
        os.makedirs(kernel.shell.profile_dir.location, exist_ok=True)
        kernel.shell.profile_dir.check_dirs()
    except (OSError, AttributeError):
        pass
    with open(cmd_fd, "rb", closefd=False) as commands:
        for line in commands:
            req = json.loads(line)
            reply = kernel.run_cell(req["code"], req["n"])
            if os.getpid() != me:
                os._exit(0)  # a fork() inside the cell returned here: only the kernel may answer
            kernel.send(reply)
    os._exit(0)
