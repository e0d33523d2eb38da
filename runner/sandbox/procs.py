"""Process and scratch-space control for the supervisor (runs inside the sandbox as PID 1; stdlib only).

The supervisor is the container's init: every orphan is reparented to it, and signals sent to it
from inside the container are dropped by the kernel unless it installed a handler (SIGKILL and
SIGSTOP included). It is made non-dumpable, so processes of the same uid can neither ptrace it
nor open anything under /proc/1 (its fds: the attach stream). What a cell leaves behind is killed
here: background processes do not outlive their cell.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import threading
import time

PR_SET_DUMPABLE = 4
IPC_RMID = 0
#: how long leftovers may take to die before the whole session is restarted instead
SETTLE_S = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


def set_dumpable(on: bool) -> None:
    """prctl(PR_SET_DUMPABLE): off in the supervisor, back on in the kernel it forks (fork keeps it)."""
    if _libc.prctl(PR_SET_DUMPABLE, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, {int(on)}): {os.strerror(err)}")


def exit_on_outside_sigterm() -> None:
    """``docker stop`` still stops the container; a cell's ``kill(1, SIGTERM)`` does nothing.

    SIGTERM is blocked and taken by a thread with sigwaitinfo(), which tells the sender: a process
    outside the container's pid namespace has no pid in it, so si_pid is 0 only for the engine."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == 0:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


def pids() -> list[int]:
    """Every process of the container's pid namespace (zombies included)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def reap() -> dict[int, int]:
    """Reap every child that has exited (the supervisor's own and reparented orphans): pid -> status."""
    done: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done[pid] = status
    return done


def kill_others(keep: int, reaped: dict[int, int]) -> bool:
    """SIGKILL every process but PID 1 and ``keep`` (stopped meanwhile, so its threads cannot fork)
    until none is left; True once the namespace holds only those two. Statuses reaped on the way
    are added to ``reaped`` (the kernel's own, should it die). False when leftovers outlast
    SETTLE_S (e.g. zombies their parent, the kernel, does not reap): the caller restarts all."""
    me = os.getpid()
    reaped.update(reap())
    if not [pid for pid in pids() if pid not in (me, keep)]:
        return True  # the usual case, and the cheap one
    deadline = time.monotonic() + SETTLE_S
    signal_quietly(keep, signal.SIGSTOP)
    try:
        while True:
            reaped.update(reap())
            others = [pid for pid in pids() if pid not in (me, keep)]
            if not others:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in others:
                signal_quietly(pid, signal.SIGKILL)
            time.sleep(0.001)  # exit is asynchronous: a killed pid leaves /proc once it is reaped
    finally:
        signal_quietly(keep, signal.SIGCONT)


def kill_all(reaped: dict[int, int]) -> bool:
    """SIGKILL every process of the container but the caller (PID 1: kill(-1) spares only it, and
    no fork can slip past it) and reap them all; True once none is left."""
    me = os.getpid()
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reaped.update(reap())
        if pids() == [me]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)


def signal_quietly(pid: int, sig: int) -> None:
    """kill(), where the process may have gone already."""
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def empty_dir(path: str) -> None:
    """Remove everything inside ``path`` (never following a link); entries a cell made unwritable
    (chmod 0) are opened up first. Only the session's own files can be there."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        full = os.path.join(path, entry.name)
        try:
            if entry.is_dir(follow_symlinks=False):
                _open_up(full)
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
        except OSError:
            pass


def _open_up(top: str) -> None:
    for root, dirs, _ in os.walk(top, topdown=True, followlinks=False):
        for name in dirs:
            try:
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(os.path.join(root, name), 0o700)
            except OSError:
                pass
    try:
        os.chmod(top, 0o700)
    except OSError:
        pass


def remove_ipc() -> None:
    """Remove System V shared memory, semaphores and message queues (they outlive their processes,
    and shared memory counts against the session's memory) and POSIX message queues."""
    calls = {
        "shm": lambda ident: _libc.shmctl(ident, IPC_RMID, None),
        "sem": lambda ident: _libc.semctl(ident, 0, IPC_RMID),
        "msg": lambda ident: _libc.msgctl(ident, IPC_RMID, None),
    }
    for kind, remove in calls.items():
        try:
            with open(f"/proc/sysvipc/{kind}") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 1 and fields[1].isdigit():
                remove(int(fields[1]))  # fails harmlessly for an object that is not ours
    if os.path.isdir("/dev/mqueue"):
        empty_dir("/dev/mqueue")
