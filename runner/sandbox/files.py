"""Output capture and /mnt/data bookkeeping for the supervisor (runs inside the sandbox; stdlib only).

Everything under /mnt/data is written by untrusted code: entries are lstat'ed, never followed,
and files are opened with O_NOFOLLOW so a symlink swapped in after the scan is refused too.
"""

from __future__ import annotations

import base64
import os
import stat
from typing import Any

MAX_ENTRIES = 10_000  # a scan stops here; a cell creating more gets a note, not a stalled session
UPLOAD_PREFIX = ".upload-"
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

    def render(self, name: str, limit: int) -> tuple[str, dict[str, Any] | None, str | None]:
        """(inline text, full output as a file or None, note or None)."""
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
        data = bytes(self.buf)
        file = {
            "name": f"{name}.txt",
            "size": len(data),
            "mime": "text/plain",
            "data": base64.b64encode(data).decode(),
        }
        return text, file, note + "."


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


def _read(path: str, key: Key, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != key[1]:
            return None  # replaced since the scan
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks) if size <= limit else None
    finally:
        os.close(fd)


def scan(
    root: str, before: dict[str, Key], max_files: int, max_bytes: int
) -> tuple[list[dict[str, Any]], list[str], dict[str, Key]]:
    """Files created or changed since ``before``: (file results, notes, new snapshot)."""
    now, capped = _walk(root)
    changed = sorted(rel for rel, key in now.items() if before.get(rel) != key)
    files: list[dict[str, Any]] = []
    notes: list[str] = []
    links = [rel for rel in changed if now[rel][0] == "link"]
    if links:
        notes.append(
            "Symbolic links are never returned: " + ", ".join(links[:5]) + (" ..." if len(links) > 5 else "")
        )
    big: list[str] = []
    left = 0
    for rel in changed:
        key = now[rel]
        if key[0] != "file":
            continue
        if key[2] > max_bytes:
            big.append(f"{rel} ({key[2]:,} bytes)")
            continue
        if len(files) >= max_files:
            left += 1
            continue
        data = _read(os.path.join(root, rel), key, max_bytes)
        if data is not None:
            files.append({"name": rel, "size": len(data), "data": base64.b64encode(data).decode()})
    if big:
        notes.append(f"Files over the {max_bytes:,}-byte limit were not returned: " + ", ".join(big[:5]))
    if left:
        notes.append(
            f"{left} more changed files under /mnt/data were not returned (at most {max_files} per cell)."
        )
    if capped:
        notes.append(
            f"/mnt/data holds more than {MAX_ENTRIES:,} entries; only the first were checked for changes."
        )
    return files, notes, now


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
