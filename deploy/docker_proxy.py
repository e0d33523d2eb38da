"""codeloop-docker-proxy: the worker's only door to the Docker engine.

A worker that holds the Docker socket is root on its host: one ``Privileged`` container or a
bind mount of ``/`` and the sandbox is moot. Path-level proxies (e.g. docker-socket-proxy) allow
"containers, POST" as a class, which still includes both. This proxy allows only the calls the
runner makes and inspects their bodies:

    GET /_ping, /version, /images/<allowed image>/json
    POST /containers/create            only hardened sandboxes of an allowed image (see _create)
    GET /containers/json               rewritten to list only codeloop sandboxes
    /containers/<id>/{json,start,attach,kill,stop,wait,logs,rename}, DELETE /containers/<id>
                                       only on containers labelled as codeloop sandboxes

Everything else is answered 403 with the reason, the way the engine reports its own errors.
Each request is forwarded on a fresh upstream connection with ``Connection: close`` (attach
upgrades are piped raw both ways), so no second request can slip past the check on a reused
connection. Stdlib only: it runs in the service image or any python:3 image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

log = logging.getLogger("codeloop.docker_proxy")
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
_VERSION = re.compile(r"^/v\d+\.\d+(?=/)")
_CONTAINER_OP = re.compile(r"^/containers/([A-Za-z0-9][\w.-]*)(/([a-z]+))?$")
_CONTAINER_OPS = {
    ("GET", "json"), ("GET", "logs"), ("POST", "start"), ("POST", "attach"), ("POST", "kill"),
    ("POST", "stop"), ("POST", "wait"), ("POST", "rename"), ("DELETE", ""),
}
_IMAGE_INSPECT = re.compile(r"^/images/(.+)/json$")
_SHARED_NS = {"PidMode", "IpcMode", "UTSMode", "UsernsMode", "CgroupnsMode", "Cgroup"}
_MUST_BE_EMPTY = (
    "Binds", "VolumesFrom", "Devices", "DeviceRequests", "DeviceCgroupRules", "Sysctls", "CapAdd",
    "PortBindings", "Links", "CgroupParent", "VolumeDriver",
)


class Denied(Exception):
    """A request the policy refuses; the message is sent to the client."""


@dataclass
class Policy:
    upstream: str = "unix:///var/run/docker.sock"
    images: list[str] = field(default_factory=lambda: ["codeloop-sandbox:latest"])
    runtimes: list[str] = field(default_factory=lambda: ["runc", "runsc"])
    label: str = "codeloop.session"

    async def call(self, method: str, path: str) -> tuple[int, Any]:
        """One JSON request to the engine, on its own connection."""
        reader, writer = await _connect(self.upstream)
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode())
            raw = await reader.read(-1)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, json.loads(body) if body.strip() else None

    async def image_id(self, name: str) -> str | None:
        status, info = await self.call("GET", f"/images/{quote(name, safe='/:@')}/json")
        return str(info["Id"]) if status == 200 else None

    async def allowed_image(self, name: str) -> dict[str, Any]:
        """The image's inspect data if ``name`` is (an id of) an allowed image, else Denied."""
        status, info = await self.call("GET", f"/images/{quote(name, safe='/:@')}/json")
        if status == 200:
            allowed = {await self.image_id(n) for n in self.images}
            if info["Id"] in allowed:
                return dict(info)
        raise Denied(f"image {name!r} is not an allowed sandbox image ({', '.join(self.images)})")

    async def owned(self, ref: str) -> str:
        """The full id of container ``ref`` if it is a codeloop sandbox, else Denied."""
        status, info = await self.call("GET", f"/containers/{quote(ref)}/json")
        labels = ((info or {}).get("Config") or {}).get("Labels") or {}
        if status != 200 or labels.get(self.label) != "1":
            raise Denied(f"container {ref!r} is not a codeloop sandbox (label {self.label}=1)")
        return str(info["Id"])

    async def check(self, method: str, path: str, query: str, body: bytes) -> tuple[str, bytes]:
        """Decide one request; returns the (possibly rewritten) path?query and body."""
        route = _VERSION.sub("", path)
        prefix = path[: len(path) - len(route)]
        if method in ("GET", "HEAD") and route in ("/_ping", "/version"):
            return _target(path, query), body
        if method == "GET" and (m := _IMAGE_INSPECT.match(route)):
            await self.allowed_image(m.group(1))
            return _target(path, query), body
        if method == "POST" and route == "/containers/create":
            await self._create(json.loads(body or b"{}"))
            return _target(path, query), body
        if method == "GET" and route == "/containers/json":
            return _target(path, self._only_ours(query)), body
        m = _CONTAINER_OP.match(route)
        if m and (method, m.group(3) or "") in _CONTAINER_OPS:
            # forward by full id, so a name cannot be swapped between the check and the call
            cid = await self.owned(m.group(1))
            return _target(f"{prefix}/containers/{cid}{m.group(2) or ''}", query), body
        raise Denied(f"{method} {route} is not an API call codeloop sandboxes need")

    def _only_ours(self, query: str) -> str:
        params = parse_qs(query)
        filters = json.loads(params.get("filters", ["{}"])[0] or "{}")
        labels = filters.get("label", [])
        # the engine takes label filters as a list or as {"k=v": true}; both AND with ours
        if isinstance(labels, dict):
            labels = [k for k, v in labels.items() if v]
        filters["label"] = [*labels, f"{self.label}=1"]
        params["filters"] = [json.dumps(filters)]
        return urlencode(params, doseq=True)

    async def _create(self, cfg: dict[str, Any]) -> None:
        image = await self.allowed_image(str(cfg.get("Image") or ""))
        if (cfg.get("Labels") or {}).get(self.label) != "1":
            raise Denied(f"sandbox containers must carry the label {self.label}=1")
        user = str(cfg.get("User") or (image.get("Config") or {}).get("User") or "")
        if user.split(":")[0] in ("", "0", "root"):
            raise Denied(f"sandboxes must run as a non-root user (got {user or 'the default, root'!r})")
        if cfg.get("Volumes"):
            raise Denied("sandboxes may not declare volumes")
        endpoints = ((cfg.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}).keys()
        if set(endpoints) - {"none"}:
            raise Denied("sandboxes may not join networks")
        hc: dict[str, Any] = cfg.get("HostConfig") or {}
        _require(not hc.get("Privileged"), "Privileged must be false")
        _require(hc.get("NetworkMode") == "none", f"NetworkMode must be none, not {hc.get('NetworkMode')!r}")
        _require(hc.get("ReadonlyRootfs") is True, "ReadonlyRootfs must be true")
        _require("ALL" in [c.upper() for c in hc.get("CapDrop") or []], "CapDrop must include ALL")
        opts = [str(o).replace("=", ":") for o in hc.get("SecurityOpt") or []]
        _require(any(o in ("no-new-privileges", "no-new-privileges:true") for o in opts),
                 "SecurityOpt must include no-new-privileges")
        _require(not any("unconfined" in o or o == "label:disable" for o in opts),
                 f"SecurityOpt may not weaken confinement (got {opts})")
        for key in _MUST_BE_EMPTY:
            _require(not hc.get(key), f"{key} must be empty")
        for key in _SHARED_NS:
            _require(hc.get(key) in (None, "", "private"), f"{key} may not be {hc.get(key)!r}")
        _require(not hc.get("PublishAllPorts") and not hc.get("OomKillDisable"), "no ports, keep OOM kill")
        _require(hc.get("MaskedPaths") is None and hc.get("ReadonlyPaths") is None, "/proc masks are fixed")
        _require(all(m.get("Type") == "tmpfs" for m in hc.get("Mounts") or []), "only tmpfs mounts")
        _require(int(hc.get("PidsLimit") or 0) > 0, "PidsLimit must be set")
        _require(int(hc.get("Memory") or 0) > 0, "Memory must be set")
        runtime = hc.get("Runtime") or ""
        _require(runtime in ("", *self.runtimes), f"Runtime {runtime!r} is not allowed ({self.runtimes})")


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise Denied("sandbox HostConfig: " + reason)


def _target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(address)
    if url.scheme == "unix":
        return await asyncio.open_unix_connection(url.path)
    return await asyncio.open_connection(url.hostname, url.port or 2375)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    if len(head) > MAX_HEAD:
        raise Denied("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
    lower = {k.lower(): v for k, v in headers}
    body = b""
    if "chunked" in lower.get("transfer-encoding", "").lower():
        while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            body += (await reader.readexactly(size + 2))[:-2]
            if len(body) > MAX_BODY:
                raise Denied("request body too large")
        await reader.readuntil(b"\r\n")
    elif (length := int(lower.get("content-length", "0"))) > 0:
        if length > MAX_BODY:
            raise Denied("request body too large")
        body = await reader.readexactly(length)
    return method, target, headers, body


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()  # half-close: the attach stream's stdin EOF must reach the sandbox
    except (ConnectionError, OSError):
        pass


async def handle(policy: Policy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await _read_request(reader)
        if request is None:
            return
        method, raw_target, headers, body = request
        url = urlsplit(raw_target)
        try:
            target, body = await policy.check(method, url.path, url.query, body)
        except (Denied, ValueError, KeyError, TypeError) as exc:
            log.warning("denied %s %s: %s", method, url.path, exc)
            payload = json.dumps({"message": f"codeloop-docker-proxy: denied: {exc}"}).encode()
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            return
        upgrade = any(k.lower() == "upgrade" for k, _ in headers)
        hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}
        out = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers if k.lower() not in hop]
        out += ["Connection: Upgrade" if upgrade else "Connection: close", f"Content-Length: {len(body)}"]
        up_reader, up_writer = await _connect(policy.upstream)
        try:
            up_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            await up_writer.drain()
            if upgrade:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            else:
                await _pipe(up_reader, writer)
        finally:
            up_writer.close()
    except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, Denied) as exc:
        log.info("connection dropped: %s", exc)
    finally:
        writer.close()


async def serve(policy: Policy, listen: str) -> asyncio.Server:
    def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> asyncio.Task[None]:
        return asyncio.ensure_future(handle(policy, r, w))

    url = urlsplit(listen)
    if url.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(url.path)  # a stale socket from a previous run
        server = await asyncio.start_unix_server(on_client, url.path, limit=MAX_HEAD)
        # owner and group only: compose runs the proxy as 0:10001, the worker's group
        os.chmod(url.path, 0o660)
        return server
    return await asyncio.start_server(on_client, url.hostname, url.port or 2375, limit=MAX_HEAD)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="codeloop-docker-proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default=env("PROXY_LISTEN", "tcp://0.0.0.0:2375"))
    parser.add_argument("--upstream", default=env("PROXY_UPSTREAM", "unix:///var/run/docker.sock"))
    parser.add_argument("--images", default=env("PROXY_ALLOWED_IMAGES", env("CODELOOP_SANDBOX_IMAGE",
                                                "codeloop-sandbox:latest")), help="comma-separated")
    parser.add_argument("--runtimes", default=env("PROXY_ALLOWED_RUNTIMES", "runc,runsc"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=env("PROXY_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    policy = Policy(args.upstream, [i for i in args.images.split(",") if i],
                    [r for r in args.runtimes.split(",") if r])

    async def run() -> None:
        server = await serve(policy, args.listen)
        log.info("listening on %s -> %s; sandbox images %s", args.listen, args.upstream, policy.images)
        async with server:
            await server.serve_forever()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
