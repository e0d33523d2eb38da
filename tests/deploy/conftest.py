"""Fixtures for the docker proxy tests: the real proxy process in front of the real engine.

The proxy runs as a subprocess (as in compose), by default on a unix socket in a temporary
folder; the allowed "sandbox image" is the local base image unless a test names another.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.types import LogConfig, Ulimit

from runner.hardening import security_opt
from tests.deploy.images import base_image

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "deploy" / "docker_proxy.py"
BASE_IMAGE = base_image()  # codeloop/base:bookworm or python:3.12-slim, whichever the engine has
TEST_LABEL = "codeloop.test-proxy"


@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    address: str  # unix:///path or tcp://127.0.0.1:port
    log: Path

    @property
    def path(self) -> str:
        return self.address.removeprefix("unix://")

    def client(self, **kw: Any) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.address, version="auto", timeout=30, **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, str(PROXY), *args], stdout=out, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, **(env or {})})


def wait_listening(proc: subprocess.Popen[str], address: str, log: Path) -> None:
    """Until the proxy accepts connections (it prints nothing we could wait on before that)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"proxy exited with {proc.returncode}: {log.read_text()}")
        try:
            if address.startswith("unix://"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(address.removeprefix("unix://"))
            else:
                host, _, port = address.removeprefix("tcp://").rpartition(":")
                socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"proxy did not listen on {address}: {log.read_text()}")


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    try:
        client.images.get(BASE_IMAGE)
    except Exception as exc:
        pytest.fail(f"{BASE_IMAGE} missing or engine unreachable ({exc}); deploy/build-base-image.sh builds "
                    "codeloop/base:bookworm, or set CODELOOP_TEST_BASE_IMAGE")
    yield client
    for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}=1"}):
        with contextlib.suppress(docker.errors.APIError):
            c.remove(force=True)
    client.close()


@pytest.fixture(scope="module")
def start_proxy(
    engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Proxy]]:
    """Start a proxy (``listen`` defaults to a fresh unix socket); all are stopped at module end."""
    started: list[Proxy] = []
    upstream = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")

    def factory(*extra: str, images: str = BASE_IMAGE, listen: str | None = None,
                env: dict[str, str] | None = None) -> Proxy:
        folder = tmp_path_factory.mktemp("proxy")
        address = listen or f"unix://{folder}/docker.sock"
        log = folder / "proxy.log"
        proc = launch(["--listen", address, "--upstream", upstream, "--images", images, *extra], log, env)
        wait_listening(proc, address, log)
        proxy = Proxy(proc, address, log)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.proc.terminate()
        proxy.proc.wait(10)


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy()


@pytest.fixture(scope="module")
def proxied(proxy: Proxy) -> Iterator[docker.DockerClient]:
    client = proxy.client()
    yield client
    client.close()


def exchange(proxy: Proxy, data: bytes, wait_s: float = 20.0) -> bytes:
    """Send raw bytes to the proxy's unix socket and read everything until it closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(wait_s)
        s.connect(proxy.path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # the proxy may answer (413) and close before reading all of it
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def statuses(raw: bytes) -> list[int]:
    """The status code of every HTTP response in ``raw`` (a response per line that starts one)."""
    return [int(line.split(b" ")[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


# --- create bodies ----------------------------------------------------------------------------------
class Obj(list[tuple[str, Any]]):
    """A JSON object as ordered pairs, so a test can write duplicate keys."""


def to_obj(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj((k, to_obj(v)) for k, v in value.items())
    if isinstance(value, list) and not isinstance(value, Obj):
        return [to_obj(v) for v in value]
    return value


def dumps(value: Any) -> str:
    if isinstance(value, Obj):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def sandbox_body(image: str = BASE_IMAGE, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The create body the docker SDK sends for a hardened sandbox (as runner/config.py builds it)."""
    api = docker.APIClient(version="1.41")
    host = api.create_host_config(
        network_mode="none", read_only=True, tmpfs={"/tmp": "rw,nosuid,nodev,size=16m,uid=10001,gid=10001"},
        cap_drop=["ALL"], security_opt=security_opt(), pids_limit=64, mem_limit="128m", memswap_limit="128m",
        nano_cpus=500_000_000, ulimits=[Ulimit(name="nofile", soft=256, hard=256)],
        log_config=LogConfig(type="none"), init=True, ipc_mode="private",
    )
    spec: dict[str, Any] = api.create_container_config(
        image, ["cat"], user="10001:10001", stdin_open=True, network_disabled=True, working_dir="/tmp",
        hostname="sandbox", labels={"codeloop.session": "1", TEST_LABEL: "1", **(labels or {})},
        host_config=host,
    )
    api.close()
    return {k: v for k, v in spec.items() if v is not None}


def with_pairs(body: dict[str, Any], where: str, *pairs: tuple[str, Any]) -> bytes:
    """``body`` as JSON with ``pairs`` appended to the object at ``where`` ("" or "HostConfig")."""
    top = to_obj(body)
    target = top if not where else next(v for k, v in top if k == where)
    target.extend((k, to_obj(v)) for k, v in pairs)
    return dumps(top).encode()


def http(method: str, target: str, body: bytes = b"", headers: str = "", chunks: list[int] | None = None) -> bytes:
    """One raw HTTP/1.1 request; ``chunks`` sends the body chunked in pieces of those sizes."""
    head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\n{headers}"
    if body:
        head += "Content-Type: application/json\r\n"
    if chunks is None:
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    out, pos = bytearray(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()), 0
    for size in [*chunks, len(body)]:
        piece = body[pos : pos + size]
        pos += len(piece)
        if piece:
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")
