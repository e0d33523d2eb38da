"""The HTTP edge of codeloop-docker-proxy: one request read strictly, answers, raw pipes.

Strict on purpose: a request line in origin form, header lines without bare LF, NUL or folding,
at most one Content-Length (decimal) or one ``Transfer-Encoding: chunked`` (never both), chunk
sizes in plain hex, a bounded head and body. Anything else is a 400, so the proxy and the engine
can never disagree about where one request ends. Stdlib only, like the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from docker_proxy_policy import Denied

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
_REQUEST_LINE = re.compile(r"(GET|HEAD|POST|DELETE|PUT|PATCH|OPTIONS) (/[!-~]*) HTTP/1\.[01]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,7})(;[^\r\n]*)?\r\n")


class BadRequest(Denied):
    status = 400


class TooLarge(Denied):
    status = 413


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def upgrade(self) -> bool:
        tokens = {t.strip().lower() for v in self.header("connection") for t in v.split(",")}
        return bool(self.header("upgrade")) or "upgrade" in tokens


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request, strictly: no bare LF, no folding, one length, chunked or not, bounded."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("incomplete request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise TooLarge("request head too large") from None
    lines = raw[:-4].decode("latin-1").split("\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise BadRequest("malformed request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise BadRequest(f"malformed header line {line[:60]!r}")
        headers.append((name, value))
    url = urlsplit(m.group(2))
    request = Request(m.group(1), url.path, url.query, headers, b"")
    lengths, encodings = request.header("content-length"), request.header("transfer-encoding")
    if encodings:
        if lengths or len(encodings) > 1 or encodings[0].lower() != "chunked":
            raise BadRequest("only one Transfer-Encoding: chunked, without Content-Length")
        request.body = await _read_chunked(reader)
    elif lengths:
        if len(lengths) > 1 or not lengths[0].isascii() or not lengths[0].isdigit() or len(lengths[0]) > 9:
            raise BadRequest("one decimal Content-Length")
        if int(lengths[0]) > MAX_BODY:
            raise TooLarge(f"request body over {MAX_BODY} bytes")
        request.body = await reader.readexactly(int(lengths[0]))
    return request


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        m = _CHUNK.fullmatch(await reader.readuntil(b"\r\n"))
        if m is None:
            raise BadRequest("malformed chunk size line")
        size = int(m.group(1), 16)
        if len(body) + size > MAX_BODY:
            raise TooLarge(f"request body over {MAX_BODY} bytes")
        if size == 0:
            break
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise BadRequest("chunk not followed by CRLF")
        body += chunk[:-2]
    for _ in range(32):  # trailer fields, then the empty line
        if await reader.readuntil(b"\r\n") == b"\r\n":
            return bytes(body)
    raise BadRequest("too many trailer fields")


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()  # half-close: the attach stream's stdin EOF must reach the sandbox
    except (ConnectionError, OSError):
        pass


async def answer(writer: asyncio.StreamWriter, exc: Denied) -> None:
    kind = "denied" if exc.status == 403 else "bad request"
    payload = json.dumps({"message": f"codeloop-docker-proxy: {kind}: {exc}"}).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large"}[exc.status]
    writer.write(f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()


async def relay_refusal(up_reader: asyncio.StreamReader, head: bytes, writer: asyncio.StreamWriter) -> None:
    """The engine answered an attach without taking the connection over: copy its answer, then stop
    (the upstream connection is kept alive by the engine and must see nothing more)."""
    lower = head.lower()
    m = re.search(rb"\r\ncontent-length: *([0-9]{1,9})\r\n", lower)
    if m:
        writer.write(await up_reader.readexactly(min(int(m.group(1)), MAX_BODY)))
    elif b"\r\ntransfer-encoding: chunked\r\n" in lower:
        writer.write(await _read_chunked(up_reader))
    await writer.drain()


async def discard(reader: asyncio.StreamReader, limit: int = MAX_BODY, wait_s: float = 2.0) -> None:
    """Read what the client still sends (a pipelined request) and drop it, so closing does not reset
    the connection before the client has read our answer."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait_s):
            while limit > 0 and (data := await reader.read(65536)):
                limit -= len(data)


def dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
