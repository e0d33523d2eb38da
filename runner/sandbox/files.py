"""Output capture and /mnt/data bookkeeping for the supervisor (runs inside the sandbox; stdlib only).

Everything under /mnt/data is written by untrusted code: entries are lstat'ed, never followed,
and files are opened with O_NOFOLLOW so a symlink swapped in after the scan is refused too.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

MAX_ENTRIES = 10_000  # a scan stops here; a cell creating more gets a note, not a stalled session
UPLOAD_PREFIX = ".upload-"
CHUNK = 3 << 16  # bytes read and base64-encoded at a time (a multiple of 3)
Key = tuple[str, int, int, int]


class Output:
    """One stream of a cell: the first ``cap`` bytes in full, plus a rolling tail for display."""

    def __init__(self, cap: int, chars: int) -> None:
        self.cap, self.chars = cap, chars
        self.buf = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += chunk[:room]
        self.tail += chunk
        keep = self.chars * 4  # UTF-8 needs at most 4 bytes a character
        if len(self.tail) > 2 * keep:
            del self.tail[:-keep]

    def render(self, name: str, limit: int) -> tuple[str, Outgoing | None, str | None]:
        """(inline text, full output as a file to stream or None, note or None)."""
        if self.total == len(self.buf):
            text = self.buf.decode("utf-8", "replace")
            if len(text) <= limit:
                return text, None, None
        half = limit // 2
        head = self.buf[: half * 4].decode("utf-8", "replace")[:half]
        tail_bytes = bytes(self.tail[-half * 4 :])
        while tail_bytes and 0x80 <= tail_bytes[0] < 0xC0:
            tail_bytes = tail_bytes[1:]  # do not start inside a multi-byte character
        tail = tail_bytes.decode("utf-8", "replace")[-half:]
        marker = f"output truncated: {self.total:,} bytes in all; full output in {name}.txt"
        text = f"{head}\n... [{marker}] ...\n{tail}"
        note = f"The {name} was too long to show ({self.total:,} bytes); it is attached in full as {name}.txt"
        if self.total > len(self.buf):
            note += f" (its first {self.cap:,} bytes; the rest was dropped)"
        return text, Outgoing(f"{name}.txt", len(self.buf), "text/plain", data=self.buf), note + "."


def oom_kills() -> int | None:
    """The memory cgroup's OOM kill counter (cgroup v1 or v2), None where it cannot be read."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None


def cpu_seconds() -> float | None:
    """CPU time the container has used (its cgroup: v2 ``cpu.stat`` usage_usec, v1
    ``cpuacct.usage`` in ns), None where neither can be read (e.g. gVisor)."""
    try:
        with open("/sys/fs/cgroup/cpu.stat") as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
    except (OSError, ValueError):
        pass
    for path in ("/sys/fs/cgroup/cpuacct/cpuacct.usage", "/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage"):
        try:
            with open(path) as fh:
                return int(fh.read()) / 1e9
        except (OSError, ValueError):
            continue
    return None


def _walk(root: str) -> tuple[dict[str, Key], bool]:
    """rel path -> (kind, inode, size, mtime_ns) of every file and symlink; True when capped."""
    seen: dict[str, Key] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel_dir)))
        except OSError:
            continue
        for entry in entries:
            if len(seen) >= MAX_ENTRIES:
                return seen, True
            rel = os.path.join(rel_dir, entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
            elif stat.S_ISREG(st.st_mode) and not entry.name.startswith(UPLOAD_PREFIX):
                seen[rel] = ("file", st.st_ino, st.st_size, st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                seen[rel] = ("link", st.st_ino, 0, st.st_mtime_ns)
    return seen, False


def snapshot(root: str) -> dict[str, Key]:
    return _walk(root)[0]


def name_ok(rel: str) -> bool:
    """Whether a path the cell wrote may be handed back as it is: valid UTF-8 (a name that is not
    decodes to lone surrogates), no control character or backslash, each part at most 255 bytes."""
    try:
        raw = rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if len(raw) > 4096 or any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in rel):
        return False
    return all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in rel.split("/"))


def shown(rel: str) -> str:
    """A name for a note: undecodable bytes and control characters as visible escapes."""
    return repr(rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


@dataclass
class Outgoing:
    """One file of a reply, streamed when the reply is written: from memory or from /mnt/data."""

    name: str
    size: int
    mime: str | None = None
    data: bytes | bytearray | None = None
    path: str = ""
    ino: int = 0

    def stream(self, write: Callable[[bytes], None], sep: bytes = b"") -> bool:
        """Write ``sep`` and this file's JSON object (base64 data, at most ``size`` bytes); False,
        writing nothing, when the file is gone or was replaced since the scan."""
        if self.data is not None:
            view = memoryview(self.data)[: self.size]
            self._emit(write, sep, (view[i : i + CHUNK] for i in range(0, len(view), CHUNK)))
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_ino != self.ino:
                return False
            self._emit(write, sep, _chunks(fd, self.size))
            return True
        finally:
            os.close(fd)

    def _emit(self, write: Callable[[bytes], None], sep: bytes, chunks: Iterable[bytes | memoryview]) -> None:
        head = {"name": self.name, **({"mime": self.mime} if self.mime else {})}
        write(sep + json.dumps(head)[:-1].encode() + b', "data": "')
        size, carry = 0, b""
        for chunk in chunks:
            size += len(chunk)
            block = carry + bytes(chunk)
            cut = len(block) - len(block) % 3  # base64 of whole 3-byte groups concatenates cleanly
            write(base64.b64encode(block[:cut]))
            carry = block[cut:]
        write(base64.b64encode(carry) + b'", "size": %d}' % size)


def _chunks(fd: int, limit: int) -> Iterator[bytes]:
    left = limit
    while left > 0:
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:
            return  # shorter than at the scan: what is there is returned
        left -= len(chunk)
        yield chunk


def scan(
    root: str, before: dict[str, Key], max_files: int, max_bytes: int, total: int, used: int = 0
) -> tuple[list[Outgoing], list[str], dict[str, Key]]:
    """Files created or changed since ``before``, in name order, while at most ``max_files`` of
    them and ``total`` bytes together (``used`` already taken) are returned: (files to stream,
    notes, new snapshot). Sizes are the scan's ``st_size``, so a sparse or oversized file is judged
    before a byte of it is read."""
    budget = total - used
    now, capped = _walk(root)
    changed = sorted(rel for rel, key in now.items() if before.get(rel) != key)
    files: list[Outgoing] = []
    notes: list[str] = []
    links = [rel for rel in changed if now[rel][0] == "link"]
    if links:
        notes.append("Symbolic links are never returned: " + _names(links))
    big: list[str] = []
    bad: list[str] = []
    rest: list[str] = []
    left = 0
    for rel in changed:
        key = now[rel]
        if key[0] != "file":
            continue
        if not name_ok(rel):
            bad.append(rel)
        elif key[2] > max_bytes:
            big.append(f"{shown(rel)} ({key[2]:,} bytes)")
        elif len(files) >= max_files:
            left += 1
        elif rest or key[2] > budget:
            rest.append(rel)
        else:
            files.append(Outgoing(rel, key[2], path=os.path.join(root, rel), ino=key[1]))
            budget -= key[2]
    if bad:
        notes.append(
            "Files whose names are not plain UTF-8 text (or hold control characters or a backslash) "
            "were not returned; rename them: " + _names(bad)
        )
    if big:
        notes.append(f"Files over the {max_bytes:,}-byte limit were not returned: " + ", ".join(big[:5]))
    if rest:
        notes.append(
            f"{len(rest)} more changed files were not returned (the files of one cell are capped at "
            f"{total:,} bytes together): " + _names(rest)
        )
    if left:
        notes.append(
            f"{left} more changed files under /mnt/data were not returned (at most {max_files} per cell)."
        )
    if capped:
        notes.append(
            f"/mnt/data holds more than {MAX_ENTRIES:,} entries; only the first were checked for changes."
        )
    return files, notes, now


def _names(rels: list[str]) -> str:
    return ", ".join(shown(rel) for rel in rels[:5]) + (" ..." if len(rels) > 5 else "")


def write_upload(root: str, name: str, data: bytes) -> str:
    """Place an upload at root/name atomically; a symlink already at that name is replaced, not followed."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(UPLOAD_PREFIX)
        or len(name.encode()) > 255
    ):
        raise ValueError(f"invalid file name {name!r}")
    tmp = os.path.join(root, f"{UPLOAD_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, os.path.join(root, name))
    return name
