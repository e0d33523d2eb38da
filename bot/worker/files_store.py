"""The worker's copy of each thread's /mnt/data, so a fresh session gets the thread's files back.

The sandbox never mounts host storage (a volume per thread clashes with the per-session random uids,
has no size cap, and the engine proxy allows no such mount). Instead the worker keeps what it already
holds: every upload it puts and every file a cell returns (names and sizes re-checked by
runner/results.py) are written here, under ``CODELOOP_FILES_DIR/<hash of the conversation>/data/``.
When a thread gets a fresh session (idle reaped, crashed, engine lost, worker restarted), the files
are put back before its next cell (bot/worker/sandbox_link.py).

* Names are the host-checked relative names; the thread's folder is named by a hash of the
  conversation key (never by anything from the sandbox), and every path is walked component by
  component with ``O_NOFOLLOW`` from the thread's folder, so nothing is written outside it.
* Capped at ``CODELOOP_SANDBOX_DATA_SIZE`` per thread: the oldest files are evicted first (the newest
  are the ones a follow-up asks about); a file larger than the whole cap is not kept. What was
  evicted or never returned is named in the note of the next restore.
* Expires with the conversation (``CODELOOP_CONVERSATION_TTL_S`` since the thread's last job), removed
  on reset and by ``codeloop sandbox clean``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.core.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATA = "data"
#: names kept of files evicted or not returned, for the next restore's note
MAX_DROPPED = 20
#: how often one process looks for expired threads
SWEEP_EVERY_S = 3600.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parse_size(text: str) -> int:
    """Bytes of a Docker-style size ("256m", "1g", "4096")."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    scale = 1024 ** " kmgt".index((match.group(2) or " ").lower())
    return int(float(match.group(1)) * scale)


def default_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "codeloop", "files")


def _open_dir(parent: int, name: str) -> int:
    """``name`` in ``parent`` as a directory fd, made if missing; a file or link there is replaced."""
    for _ in range(3):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            os.unlink(name, dir_fd=parent)  # a file (or a link: never followed) where a folder goes
    raise OSError(errno.EIO, f"cannot make the folder {name!r}")


def _walk(root_fd: int, parts: list[str]) -> int:
    fd = os.dup(root_fd)
    for part in parts:
        try:
            nxt = _open_dir(fd, part)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _remove_entry(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


@dataclass
class Manifest:
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # rel -> {"size", "seq"}
    seq: int = 0
    dropped: list[str] = field(default_factory=list)
    #: a cell wrote files that were not returned (over the return caps): they cannot come back
    unreturned: bool = False

    @property
    def total(self) -> int:
        return sum(item["size"] for item in self.files.values())


class ThreadFiles:
    """One thread's stored files. Only the job holding the thread's lock uses it (one at a time)."""

    def __init__(self, folder: Path, cap: int) -> None:
        self.folder = folder
        self.cap = cap

    # --- manifest -----------------------------------------------------------------------------
    def _load(self) -> Manifest:
        try:
            raw = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return Manifest()
        files = {str(k): {"size": int(v["size"]), "seq": int(v["seq"])} for k, v in raw.get("files", {}).items()}
        return Manifest(files, int(raw.get("seq", 0)), [str(n) for n in raw.get("dropped", [])][-MAX_DROPPED:],
                        bool(raw.get("unreturned", False)))

    def _dump(self, m: Manifest) -> None:
        tmp = self.folder / f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps({"files": m.files, "seq": m.seq, "dropped": m.dropped[-MAX_DROPPED:],
                                   "unreturned": m.unreturned}))
        os.replace(tmp, self.folder / MANIFEST)

    def _data_fd(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        root = os.open(self.folder, _DIR_FLAGS)
        try:
            return _open_dir(root, DATA)
        finally:
            os.close(root)

    # --- public -------------------------------------------------------------------------------
    def touch(self) -> None:
        """The thread is in use: its expiry starts again."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.folder)

    def names(self) -> list[str]:
        files = self._load().files
        return sorted(files, key=lambda rel: files[rel]["seq"])

    def save(self, rel: str, data: bytes) -> list[str]:
        """Keep ``data`` as ``rel`` (a host-checked relative name); returns notes for the model and user."""
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a relative name: {rel!r}")
        m = self._load()
        # the file replaces rel, a folder rel/ (and what was in it), or files where its folders go
        m.files = {k: v for k, v in m.files.items()
                   if k != rel and not k.startswith(rel + "/") and not rel.startswith(k + "/")}
        if len(data) > self.cap:
            self._delete(rel)
            m.dropped = [*[n for n in m.dropped if n != rel], rel]
            self._dump(m)
            return [f"{rel} ({len(data):,} bytes) is larger than this thread's file store ({self.cap:,} bytes): "
                    "it will not be restored if the Python session is lost."]
        evicted: list[str] = []
        while m.files and m.total + len(data) > self.cap:
            oldest = min(m.files, key=lambda n: m.files[n]["seq"])
            del m.files[oldest]
            self._delete(oldest)
            evicted.append(oldest)
        self._write(parts, data)
        m.seq += 1
        m.files[rel] = {"size": len(data), "seq": m.seq}
        m.dropped = [n for n in m.dropped if n != rel and n not in m.files] + evicted
        self._dump(m)
        if not evicted:
            return []
        return [f"This thread keeps at most {self.cap:,} bytes of files for a new Python session; the oldest "
                f"were dropped from that copy (they stay in /mnt/data while this session lives): "
                + ", ".join(evicted[:5]) + (" ..." if len(evicted) > 5 else "")]

    def mark_unreturned(self) -> None:
        m = self._load()
        if not m.unreturned:
            m.unreturned = True
            self._dump(m)

    def _write(self, parts: list[str], data: bytes) -> None:
        root = self._data_fd()
        try:
            fd = _walk(root, parts[:-1])
        finally:
            os.close(root)
        name = parts[-1]
        tmp = f".tmp-{os.urandom(6).hex()}"
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
            finally:
                os.close(out)
            try:
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except (IsADirectoryError, OSError) as exc:
                if isinstance(exc, IsADirectoryError) or exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    _remove_entry(fd, name)  # a folder of that name (the sandbox replaced it by a file)
                    os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                else:
                    raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise
        finally:
            os.close(fd)

    def _delete(self, rel: str) -> None:
        parts = rel.split("/")
        try:
            root = self._data_fd()
            try:
                fd = _walk(root, parts[:-1])
            finally:
                os.close(root)
        except OSError:
            return
        try:
            _remove_entry(fd, parts[-1])
        finally:
            os.close(fd)

    def read(self, rel: str) -> bytes | None:
        """A stored file's bytes (None if it is gone), read without following links."""
        parts = rel.split("/")
        try:
            root = os.open(self.folder / DATA, _DIR_FLAGS)
        except OSError:
            return None
        fd = -1
        try:
            fd = root
            for part in parts[:-1]:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            src = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            with os.fdopen(src, "rb") as fh:
                return fh.read()
        except OSError:
            return None
        finally:
            os.close(fd)

    def restore_plan(self) -> tuple[list[str], list[str], bool]:
        """(plain names to put back, oldest first; names that cannot be: in subfolders, evicted; and
        whether a cell's files were not returned)."""
        m = self._load()
        order = sorted(m.files, key=lambda rel: m.files[rel]["seq"])
        plain = [rel for rel in order if "/" not in rel]
        nested = [rel for rel in order if "/" in rel]
        return plain, nested + m.dropped, m.unreturned

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class FilesStore:
    """All threads' stored files under one folder (shared by the workers of a deployment)."""

    _swept: dict[str, float] = {}
    _lock = threading.Lock()

    def __init__(self, root: str | os.PathLike[str], cap: int, ttl_s: float, prefix: str = "") -> None:
        self.root = Path(root)
        self.cap = cap
        self.ttl_s = ttl_s
        self.prefix = prefix

    @classmethod
    def from_settings(cls, settings: Settings) -> FilesStore:
        return cls(settings.files_dir or default_dir(), parse_size(settings.sandbox_data_size),
                   settings.conversation_ttl_s, settings.key_prefix)

    def folder_name(self, conversation_key: str) -> str:
        return hashlib.sha256(f"{self.prefix}\0{conversation_key}".encode()).hexdigest()[:40]

    def thread(self, conversation_key: str) -> ThreadFiles:
        return ThreadFiles(self.root / self.folder_name(conversation_key), self.cap)

    def maybe_sweep(self) -> None:
        """``sweep`` at most once per ``SWEEP_EVERY_S`` per folder in this process."""
        now = time.monotonic()
        with self._lock:
            last = self._swept.get(str(self.root))
            if last is not None and now - last < SWEEP_EVERY_S:
                return
            self._swept[str(self.root)] = now
        self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Remove the threads unused for longer than the conversation TTL; returns how many."""
        cutoff = (time.time() if now is None else now) - self.ttl_s
        removed = 0
        for entry in self._entries():
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
            except OSError:
                continue
        return removed

    def clear(self) -> int:
        """Remove every thread's files (``codeloop sandbox clean``); returns how many threads."""
        entries = self._entries()
        for entry in entries:
            shutil.rmtree(entry, ignore_errors=True)
        return len(entries)

    def _entries(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir()
                    if re.fullmatch(r"[0-9a-f]{40}", p.name) and p.is_dir() and not p.is_symlink()]
        except OSError:
            return []
