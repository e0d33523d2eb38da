"""codeloop-docker-proxy: the worker's only door to the Docker engine.

A worker that holds the Docker socket is root on its host: one ``Privileged`` container or a
bind mount of ``/`` and the sandbox is moot. Path-level proxies (e.g. docker-socket-proxy) allow
"containers, POST" as a class, which still includes both. This proxy allows only the calls the
runner makes, and forwards only requests it wrote itself from what it checked:

    GET /_ping, /version, /images/<allowed image>/json
    POST /containers/create            a body rebuilt from an allowlist (docker_proxy_policy.py)
    GET /containers/json               rewritten to list only codeloop sandboxes
    /containers/<id>/{json,start,attach,kill,stop,wait,logs,rename}, DELETE /containers/<id>
                                       only on containers labelled as codeloop sandboxes

Everything else is answered 403 with the reason, the way the engine reports its own errors.
One request per client connection: it is forwarded on a fresh upstream connection with
``Connection: close``, and whatever the client sent after it is read and thrown away, never
forwarded. Only ``attach`` turns into a raw stream (the sandbox's stdin and stdout), and only once
the engine has answered 101/200, so no request can ride it to the engine. Query strings and
headers are rebuilt from allowlists too; API versions below 1.40 (whose ``start`` took a
HostConfig) are refused. Listens on a unix socket (mode 0660), or on TCP with TLS and a required
client certificate; plain TCP only with ``--insecure-tcp``. Stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docker_proxy_http import (
    MAX_HEAD,
    BadRequest,
    Request,
    answer,
    dechunk,
    discard,
    pipe,
    read_request,
    relay_refusal,
)
from docker_proxy_policy import CreatePolicy, Denied, size_bytes

log = logging.getLogger("codeloop.docker_proxy")
MIN_API = (1, 40)
REQUEST_TIMEOUT_S = 60
_VERSION = re.compile(r"^/v([0-9]{1,3})\.([0-9]{1,3})(?=/)")
_CONTAINER_OP = re.compile(r"^/containers/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})(/([a-z]+))?$")
_IMAGE_INSPECT = re.compile(r"^/images/(.+)/json$")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
_BOOL = r"(?i:1|0|true|false|yes|no)"
_Q = {k: re.compile(v) for k, v in {
    "bool": _BOOL, "int": r"-?[0-9]{1,10}", "name": r"/?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}",
    "signal": r"[A-Za-z0-9+]{1,16}", "time": r"[0-9A-Za-z.:+-]{1,40}", "tail": r"all|[0-9]{1,10}",
    "keys": r"[a-z0-9,-]{1,32}", "condition": r"not-running|next-exit|removed", "false": r"(?i:0|false|no|none)?",
    "filters": r"[ -~]{0,4096}",
}.items()}
_QUERY: dict[str, dict[str, str]] = {
    "list": {"all": "bool", "limit": "int", "size": "bool", "filters": "filters", "before": "name",
             "since": "name", "trunc_cmd": "bool"},
    "create": {"name": "name"},
    "json": {"size": "bool"},
    "logs": {"stdout": "bool", "stderr": "bool", "since": "time", "until": "time", "timestamps": "bool",
             "follow": "bool", "tail": "tail", "details": "bool"},
    "start": {},
    "attach": {"logs": "bool", "stream": "bool", "stdin": "bool", "stdout": "bool", "stderr": "bool",
               "detachKeys": "keys"},
    "kill": {"signal": "signal"},
    "stop": {"t": "int", "signal": "signal"},
    "wait": {"condition": "condition"},
    "rename": {"name": "name"},
    "": {"v": "bool", "force": "bool", "link": "false"},  # DELETE /containers/<id>
}
_CONTAINER_OPS = {
    ("GET", "json"), ("GET", "logs"), ("POST", "start"), ("POST", "attach"), ("POST", "kill"),
    ("POST", "stop"), ("POST", "wait"), ("POST", "rename"), ("DELETE", ""),
}


@dataclass
class Forward:
    """The request the proxy itself writes upstream."""

    method: str
    target: str
    body: bytes = b""
    attach: bool = False

    def head(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", "Host: docker", "User-Agent: codeloop-docker-proxy"]
        lines += ["Connection: Upgrade", "Upgrade: tcp"] if self.attach else ["Connection: close"]
        if self.body:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


@dataclass
class Policy:
    create: CreatePolicy
    upstream: str = "unix:///var/run/docker.sock"
    images: list[str] = field(default_factory=lambda: ["codeloop-sandbox:latest"])
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
            body = dechunk(body)
        return status, json.loads(body) if body.strip() else None

    async def image_id(self, name: str) -> str | None:
        status, info = await self.call("GET", f"/images/{quote(name, safe='/:@')}/json")
        return str(info["Id"]) if status == 200 else None

    async def allowed_image(self, name: str) -> None:
        """Denied unless ``name`` is (an id of) an allowed image."""
        if _IMAGE_NAME.fullmatch(name) and not {".", ".."} & set(name.split("/")):
            found = await self.image_id(name)
            if found is not None and found in {await self.image_id(n) for n in self.images}:
                return
        raise Denied(f"image {name!r} is not an allowed sandbox image ({', '.join(self.images)})")

    async def owned(self, ref: str) -> str:
        """The full id of container ``ref`` if it is a codeloop sandbox, else Denied."""
        status, info = await self.call("GET", f"/containers/{quote(ref)}/json")
        labels = ((info or {}).get("Config") or {}).get("Labels") or {}
        if status != 200 or labels.get(self.label) != "1":
            raise Denied(f"container {ref!r} is not a codeloop sandbox (label {self.label}=1)")
        return str(info["Id"])

    async def check(self, req: Request) -> Forward:
        """Decide one request; the result is what goes upstream, rebuilt from checked parts."""
        method, route, prefix = req.method, *_split_version(req.path)
        op = _CONTAINER_OP.match(route)
        attach = method == "POST" and op is not None and op.group(3) == "attach"
        if req.upgrade and not attach:
            raise Denied("Upgrade is allowed only on POST /containers/<sandbox>/attach")
        if req.body and route != "/containers/create":
            raise Denied(f"{method} {route} takes no request body")
        if method in ("GET", "HEAD") and route in ("/_ping", "/version"):
            return Forward(method, prefix + route)
        if method == "GET" and (m := _IMAGE_INSPECT.match(route)):
            name = unquote(m.group(1))
            await self.allowed_image(name)
            return Forward(method, f"{prefix}/images/{quote(name, safe='/:@')}/json")
        if method == "POST" and route == "/containers/create":
            body = self.create.check(req.body)
            await self.allowed_image(body["Image"])
            query = _query(req.query, _QUERY["create"])
            return Forward(method, _target(prefix + route, query), json.dumps(body).encode())
        if method == "GET" and route == "/containers/json":
            return Forward(method, _target(prefix + route, self._only_ours(req.query)))
        if op and (method, op.group(3) or "") in _CONTAINER_OPS:
            query = _query(req.query, _QUERY[op.group(3) or ""])
            # forward by full id, so a name cannot be swapped between the check and the call
            cid = await self.owned(op.group(1))
            return Forward(method, _target(f"{prefix}/containers/{cid}{op.group(2) or ''}", query), attach=attach)
        raise Denied(f"{method} {route} is not an API call codeloop sandboxes need")

    def _only_ours(self, query: str) -> str:
        params = dict(_query(query, _QUERY["list"], encode=False))
        try:
            filters = json.loads(params.get("filters") or "{}")
        except ValueError:
            raise BadRequest("filters is not JSON") from None
        if not isinstance(filters, dict):
            raise BadRequest("filters must be a JSON object")
        for key, value in filters.items():
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)) and not (
                isinstance(value, dict) and all(isinstance(v, bool) for v in value.values())
            ):
                raise BadRequest(f"filter {key!r} must be a list of strings or an object of booleans")
        labels = filters.get("label", [])
        # the engine takes label filters as a list or as {"k=v": true}; both AND with ours
        if isinstance(labels, dict):
            labels = [k for k, v in labels.items() if v]
        filters["label"] = [*labels, f"{self.label}=1"]
        params["filters"] = json.dumps(filters)
        return urlencode(params)


def _split_version(path: str) -> tuple[str, str]:
    """(route, version prefix); API versions before MIN_API are refused."""
    m = _VERSION.match(path)
    if m is None:
        return path, ""
    if (int(m.group(1)), int(m.group(2))) < MIN_API:
        raise Denied(f"API version {m.group(1)}.{m.group(2)} is below {MIN_API[0]}.{MIN_API[1]}")
    return path[m.end():], m.group(0)


def _query(query: str, allowed: dict[str, str], encode: bool = True) -> Any:
    """The query rebuilt from known parameters with checked values; anything else is refused."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=32)
    except ValueError:
        raise BadRequest(f"malformed query string {query[:80]!r}") from None
    seen: set[str] = set()
    for key, value in pairs:
        kind = allowed.get(key)
        if kind is None or key in seen:
            raise Denied(f"query parameter {key!r} is not allowed here" if kind is None else f"{key} given twice")
        if not _Q[kind].fullmatch(value):
            raise Denied(f"query parameter {key}={value[:40]!r} is not allowed")
        seen.add(key)
    return urlencode(pairs) if encode else pairs


def _target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(address)
    if url.scheme == "unix":
        return await asyncio.open_unix_connection(url.path)
    return await asyncio.open_connection(url.hostname, url.port or 2375)


async def forward(upstream: str, fwd: Forward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    up_reader, up_writer = await _connect(upstream)
    try:
        up_writer.write(fwd.head() + fwd.body)
        await up_writer.drain()
        if not fwd.attach:
            await pipe(up_reader, writer)
            return
        head = await up_reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        if head.split(b" ", 2)[1] not in (b"101", b"200"):
            await relay_refusal(up_reader, head, writer)
            return
        # the engine has hijacked the connection: from here on it is the sandbox's stdin and stdout
        up = asyncio.ensure_future(pipe(reader, up_writer))
        try:
            await pipe(up_reader, writer)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await up
    finally:
        up_writer.close()


async def handle(policy: Policy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):  # a client that never finishes its request
                request = await read_request(reader)
                if request is None:
                    return
                fwd = await policy.check(request)
        except Denied as exc:
            log.warning("refused (%s): %s", exc.status, exc)
            await answer(writer, exc)
            if writer.can_write_eof():
                writer.write_eof()
            await discard(reader)
            return
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("refused: %s", exc)
            await answer(writer, Denied(f"cannot check this request ({type(exc).__name__})"))
            return
        log.info("allowed %s %s", request.method, fwd.target.split("?")[0][:200])
        await forward(policy.upstream, fwd, reader, writer)
        if not fwd.attach and writer.can_write_eof():
            writer.write_eof()
            await discard(reader)
    except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        log.info("connection dropped: %s", exc or type(exc).__name__)
    finally:
        writer.close()


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Server TLS that requires a client certificate signed by ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(policy: Policy, listen: str, tls: ssl.SSLContext | None = None) -> asyncio.Server:
    def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> asyncio.Task[None]:
        return asyncio.ensure_future(handle(policy, r, w))

    url = urlsplit(listen)
    if url.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(url.path)  # a stale socket from a previous run
        old = os.umask(0o117)  # created 0660: no moment when others could connect
        try:
            server = await asyncio.start_unix_server(on_client, url.path, limit=MAX_HEAD)
        finally:
            os.umask(old)
        # owner and group only: compose runs the proxy as 0:10001, the worker's group
        os.chmod(url.path, 0o660)
        return server
    return await asyncio.start_server(on_client, url.hostname, url.port or 2376, limit=MAX_HEAD, ssl=tls,
                                      ssl_handshake_timeout=10 if tls else None)


def _default_profile() -> str:
    here = Path(__file__).resolve().parent
    for path in (here / "seccomp.json", here.parent / "runner" / "seccomp.json"):
        if path.exists():
            return str(path)
    return str(here / "seccomp.json")


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="codeloop-docker-proxy", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--listen", default=env("PROXY_LISTEN", "unix:///run/codeloop-engine/docker.sock"),
                        help="unix:///path or tcp://host:port (TLS, or --insecure-tcp); default %(default)s")
    parser.add_argument("--upstream", default=env("PROXY_UPSTREAM", "unix:///var/run/docker.sock"))
    parser.add_argument("--images", default=env("PROXY_ALLOWED_IMAGES", env("CODELOOP_SANDBOX_IMAGE",
                                                "codeloop-sandbox:latest")), help="comma-separated")
    parser.add_argument("--runtimes", default=env("PROXY_ALLOWED_RUNTIMES", "runc,runsc"))
    parser.add_argument("--seccomp-profile", default=env("PROXY_SECCOMP_PROFILE", _default_profile()),
                        help="the profile every sandbox must carry (runner/seccomp.json)")
    parser.add_argument("--min-uid", type=int, default=int(env("PROXY_MIN_UID", "10000")))
    parser.add_argument("--max-memory", default=env("PROXY_MAX_MEMORY", "4g"), help="bytes, or 512m / 4g")
    parser.add_argument("--max-pids", type=int, default=int(env("PROXY_MAX_PIDS", "512")))
    parser.add_argument("--max-cpus", type=float, default=float(env("PROXY_MAX_CPUS", "4")))
    parser.add_argument("--wheelhouse", default=env("PROXY_WHEELHOUSE", env("CODELOOP_SANDBOX_WHEELHOUSE")) or None,
                        help="host directory of pip wheels sandboxes may mount read-only (the only bind mount)")
    parser.add_argument("--tls-cert", default=env("PROXY_TLS_CERT"), help="server certificate (PEM)")
    parser.add_argument("--tls-key", default=env("PROXY_TLS_KEY"), help="its private key (PEM)")
    parser.add_argument("--tls-ca", default=env("PROXY_TLS_CA"), help="CA that signs the clients' certificates")
    parser.add_argument("--insecure-tcp", action="store_true", default=env("PROXY_INSECURE_TCP", "") == "1",
                        help="allow tcp:// without TLS: anyone who reaches the port can create sandboxes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=env("PROXY_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    tls_files = [args.tls_cert, args.tls_key, args.tls_ca]
    scheme = urlsplit(args.listen).scheme
    if scheme not in ("unix", "tcp"):
        parser.error(f"--listen must be unix:// or tcp://, not {args.listen!r}")
    if any(tls_files) and (scheme != "tcp" or not all(tls_files)):
        parser.error("TLS needs a tcp:// listener and all of --tls-cert, --tls-key and --tls-ca")
    if scheme == "tcp" and not any(tls_files) and not args.insecure_tcp:
        parser.error("refusing plain TCP: anyone who reaches it could create sandboxes. Give --tls-cert, "
                     "--tls-key and --tls-ca (client certificates required), or --insecure-tcp")
    if args.min_uid < 1:
        parser.error("--min-uid must be at least 1: sandboxes never run as root")
    try:
        max_memory = size_bytes(args.max_memory)
        profile = json.loads(Path(args.seccomp_profile).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"{exc} (--max-memory, --seccomp-profile)")
    runtimes = [r for r in args.runtimes.split(",") if r]
    try:
        create = CreatePolicy(profile, runtimes, min_uid=args.min_uid, max_memory=max_memory,
                              max_pids=args.max_pids, max_cpus=args.max_cpus, wheelhouse=args.wheelhouse)
    except ValueError as exc:
        parser.error(f"{exc} (--wheelhouse)")
    policy = Policy(create, args.upstream, [i for i in args.images.split(",") if i])
    tls = tls_context(*tls_files) if all(tls_files) else None
    if scheme == "tcp" and tls is None:
        log.warning("plain TCP on %s (--insecure-tcp): no authentication", args.listen)

    async def run() -> None:
        server = await serve(policy, args.listen, tls)
        log.info("listening on %s%s -> %s; sandbox images %s", args.listen, " (TLS, client certificates)"
                 if tls else "", args.upstream, policy.images)
        async with server:
            await server.serve_forever()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
