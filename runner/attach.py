"""An asyncio client for a container's attach stream: the line protocol to the in-sandbox executor.

The docker SDK's attach is blocking and goes through requests; this does the HTTP upgrade itself
(``POST /containers/{id}/attach`` with ``Upgrade: tcp``) over the engine's Unix socket or TCP, then
demultiplexes the raw stream (tty off: 8-byte frame headers, 1 = stdout, 2 = stderr). A round trip
costs a fraction of a millisecond, where ``docker exec`` costs a hundred.

Everything on the stream was written inside the sandbox, so the reader is bounded: frames are read
in chunks of at most 64 KiB whatever their header claims, a line may not grow past ``max_line`` (the
largest reply an honest executor sends, ``ReplyLimits.max_line``), a line must be ASCII JSON (the
executor escapes the rest) that cannot grow into far more objects than bytes, and stderr is only
logged, up to a cap. Anything else is a protocol violation: reading stops, the connection closes and
``violation`` says why (the session then removes the container). One exception: a first line that
does not parse is dropped, since a worker attaching while the executor writes a line to another
worker receives only that line's tail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from bot.core.errors import MalformedReply, SandboxUnavailable, SessionLost
from runner.results import check_amplification

log = logging.getLogger(__name__)
CHUNK = 1 << 16  # bytes read at a time, whatever a frame header claims
#: stderr is only logged: the executor writes there when it crashes (a traceback), never much
STDERR_MAX = 1 << 20
STDERR_LOGGED = 8 * 1024


async def _connect(api: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw connection to the engine the docker client talks to (DOCKER_HOST included)."""
    base: str = api.base_url
    adapter = getattr(api, "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    if socket_path:
        return await asyncio.open_unix_connection(socket_path)
    url = urlparse(base)
    if url.scheme in ("http", "https") and url.hostname:
        context = None
        if url.scheme == "https":
            verify = getattr(api, "verify", True)
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            cert = getattr(api, "cert", None)
            if cert:
                context.load_cert_chain(*cert) if isinstance(cert, tuple) else context.load_cert_chain(cert)
        return await asyncio.open_connection(url.hostname, url.port or 2375, ssl=context)
    raise SandboxUnavailable(
        f"unsupported DOCKER_HOST for the sandbox attach stream: {base} "
        "(use unix://, tcp:// or tcp:// with TLS)"
    )


def _timeout(api: Any) -> float:
    """The docker client's own request timeout bounds connecting and the upgrade (60 s default)."""
    value = getattr(api, "timeout", None)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 60.0


class AttachStream:
    """One attach connection; replies are JSON lines (dicts) handed to ``on_message``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None],
        max_line: int,
    ) -> None:
        self._reader, self._writer = reader, writer
        self._on_message, self._on_close = on_message, on_close
        self._max_line = max_line
        self._line = bytearray()  # the part of a line that arrived without its newline yet
        self._stderr = 0
        self._first = True  # the first line may be the tail of one written before we attached
        self.closed = False
        #: why the stream was cut (a protocol violation), None if it ended or was closed by us
        self.violation: str | None = None
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(
        cls,
        api: Any,
        container_id: str,
        on_message: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None],
        max_line: int,
    ) -> AttachStream:
        # bounded: an engine whose host vanished must not hang the thread (runner/engines.py)
        limit = _timeout(api)
        try:
            reader, writer = await asyncio.wait_for(_connect(api), limit)
        except OSError as exc:  # TimeoutError included
            raise SandboxUnavailable(f"cannot reach the Docker engine ({exc}); is dockerd running?") from exc
        version = getattr(api, "_version", "1.41")
        request = (
            f"POST /v{version}/containers/{container_id}/attach?stream=1&stdin=1&stdout=1&stderr=1"
            " HTTP/1.1\r\n"
            "Host: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
        )
        writer.write(request.encode())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limit)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            writer.close()
            raise SessionLost(f"attach to sandbox {container_id[:12]} failed: {exc}") from exc
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        code = status.split(" ")[1] if status.count(" ") >= 1 else ""
        if code not in ("101", "200"):
            body = b""
            try:
                body = await asyncio.wait_for(reader.read(500), 1.0)
            except (TimeoutError, OSError):
                pass
            writer.close()
            raise SessionLost(
                f"sandbox {container_id[:12]} cannot be attached: {status} {body.decode(errors='replace')}"
            )
        return cls(reader, writer, on_message, on_close, max_line)

    async def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            raise SessionLost("the sandbox session has ended")
        self._writer.write(json.dumps(msg).encode() + b"\n")
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise SessionLost(f"the sandbox session has ended ({exc})") from exc

    async def _read_loop(self) -> None:
        reader = self._reader
        try:
            while True:
                header = await reader.readexactly(8)
                size = int.from_bytes(header[4:8], "big")
                if header[0] == 1 and header[1:4] == b"\0\0\0" and size <= self._max_line:
                    feed = self._feed
                elif header[0] == 2 and header[1:4] == b"\0\0\0" and size <= STDERR_MAX:
                    feed = self._feed_stderr
                else:
                    raise MalformedReply(f"a frame header {header.hex()} (stream {header[0]}, {size:,} bytes)")
                while size:
                    chunk = await reader.read(min(size, CHUNK))
                    if not chunk:
                        return
                    size -= len(chunk)
                    feed(chunk)
        except MalformedReply as exc:
            self.violation = str(exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._line = bytearray()
            self._writer.close()
            self._on_close()

    def _feed(self, chunk: bytes) -> None:
        """Split stdout into lines; a line is copied at most once, into ``_line``, when it spans chunks."""
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._line:
                self._append(chunk, start, end)
                self._handle(None)
            else:
                self._handle(chunk[start:end])
            start = end + 1
        if start < len(chunk):
            self._append(chunk, start, len(chunk))

    def _append(self, chunk: bytes, start: int, end: int) -> None:
        if len(self._line) + end - start > self._max_line:
            raise MalformedReply(f"a line longer than {self._max_line:,} bytes")
        self._line += memoryview(chunk)[start:end]

    def _handle(self, line: bytes | bytearray | None) -> None:
        if line is None:  # the buffered line: taken from self, so this frame holds its only reference
            line, self._line = self._line, bytearray()
        if not line or line.isspace():
            return
        first, self._first = self._first, False
        try:
            try:
                text = line.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedReply("a line that is not ASCII JSON") from None
            del line  # a long line is held once: as bytes, then as text, then parsed
            check_amplification(text)
            try:
                msg = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise MalformedReply(f"a line that is not JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
            del text
            if not isinstance(msg, dict):
                raise MalformedReply(f"a JSON {type(msg).__name__} where an object belongs")
        except MalformedReply:
            if first:
                # Attached while the executor was writing a line (to another worker): its tail is
                # dropped, not believed. Its length was bounded like any other line.
                log.debug("sandbox stream: skipped a partial first line")
                return
            raise
        self._on_message(msg)

    def _feed_stderr(self, chunk: bytes) -> None:
        # The executor writes stderr only when it crashes: logged (the first bytes), never parsed.
        if self._stderr < STDERR_LOGGED:
            text = chunk[: STDERR_LOGGED - self._stderr].decode(errors="replace").rstrip()
            log.debug("sandbox stderr: %s", text)
        self._stderr += len(chunk)
        if self._stderr > STDERR_MAX:
            raise MalformedReply(f"more than {STDERR_MAX:,} bytes on stderr")

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.closed = True
