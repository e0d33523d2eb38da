"""The proxy's HTTP edge: no request reaches the engine unchecked on any connection.

Raw bytes on the proxy's socket: `Upgrade` where it does not belong, requests pipelined behind a
checked one, an attach the engine refuses, chunked and oversized bodies, header tricks, and old
API versions whose `start` still took a HostConfig.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import docker
import pytest

from tests.deploy.conftest import TEST_LABEL, Proxy, exchange, http, sandbox_body, statuses

pytestmark = pytest.mark.docker
INFO = b"GET /v1.41/info HTTP/1.1\r\nHost: docker\r\n\r\n"


def leaked_info(raw: bytes) -> bool:
    return b"KernelVersion" in raw or b"ServerVersion" in raw


@pytest.fixture
def sandbox(proxy: Proxy, engine: docker.DockerClient) -> Iterator[str]:
    raw = exchange(proxy, http("POST", "/v1.41/containers/create", json.dumps(sandbox_body()).encode()))
    assert statuses(raw) == [201], raw
    cid = str(json.loads(raw.partition(b"\r\n\r\n")[2])["Id"])
    yield cid
    engine.api.remove_container(cid, force=True)


@pytest.mark.parametrize("headers", [
    "Connection: Upgrade\r\nUpgrade: tcp\r\n",
    "Connection: keep-alive, UPGRADE\r\n",
    "Upgrade: tcp\r\n",
])
@pytest.mark.parametrize("target", ["/_ping", "/v1.41/version", "/v1.41/images/codeloop/base:bookworm/json"])
def test_upgrade_outside_attach_is_refused_and_tunnels_nothing(proxy: Proxy, headers: str, target: str) -> None:
    raw = exchange(proxy, http("GET", target, headers=headers) + INFO)
    assert statuses(raw) == [403] and b"Upgrade is allowed only on POST" in raw
    assert not leaked_info(raw)


def test_upgrade_on_a_sandbox_inspect_is_refused(proxy: Proxy, sandbox: str) -> None:
    raw = exchange(proxy, http("GET", f"/v1.41/containers/{sandbox}/json", headers="Connection: Upgrade\r\n") + INFO)
    assert statuses(raw) == [403] and not leaked_info(raw)


@pytest.mark.parametrize("first", [
    http("GET", "/_ping"),
    http("GET", "/_ping", headers="Connection: keep-alive\r\n"),
    http("GET", "/_ping", chunks=[]),
    http("HEAD", "/_ping"),
])
def test_pipelined_requests_behind_a_checked_one_never_reach_the_engine(proxy: Proxy, first: bytes) -> None:
    raw = exchange(proxy, first + INFO + INFO)
    assert statuses(raw) == [200] and not leaked_info(raw)


def test_a_create_pipelined_behind_a_create_is_not_made(
    proxy: Proxy, engine: docker.DockerClient
) -> None:
    body = json.dumps(sandbox_body(labels={"codeloop.test-pipeline": "1"})).encode()
    raw = exchange(proxy, http("POST", "/containers/create", body) + http("POST", "/containers/create", body))
    assert statuses(raw) == [201]
    made = engine.containers.list(all=True, filters={"label": "codeloop.test-pipeline=1"})
    assert len(made) == 1
    made[0].remove(force=True)


def test_an_attach_the_engine_refuses_leaves_no_tunnel(proxy: Proxy, sandbox: str) -> None:
    """The engine answers an attach for an API version it does not speak with a plain 400 and keeps
    the connection: a proxy that pipes the client's bytes on after any answer hands it /info."""
    attach = http("POST", f"/v1.99/containers/{sandbox}/attach?stream=1&stdin=1",
                  headers="Connection: Upgrade\r\nUpgrade: tcp\r\n")
    raw = exchange(proxy, attach + INFO)
    assert statuses(raw) == [400] and b"too new" in raw
    assert not leaked_info(raw)


def test_bytes_after_an_attach_are_the_sandboxs_stdin(proxy: Proxy, sandbox: str) -> None:
    """What follows a granted attach goes to the container (here `cat`, which echoes it), not to the engine."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(proxy.path)
        s.sendall(http("POST", f"/v1.41/containers/{sandbox}/attach?stream=1&stdin=1&stdout=1",
                       headers="Connection: Upgrade\r\nUpgrade: tcp\r\n") + INFO)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert statuses(head) == [101]
        assert statuses(exchange(proxy, http("POST", f"/v1.41/containers/{sandbox}/start"))) == [204]
        frame = b""
        while len(frame) < 8 or len(frame) < 8 + struct.unpack(">I", frame[4:8])[0]:
            frame += s.recv(65536)
        assert frame[0] == 1 and frame[8:] == INFO  # stdout: our "request", echoed by cat


@pytest.mark.parametrize("version", ["/v1.23", "/v1.41"])
def test_start_with_a_hostconfig_body_is_refused(
    proxy: Proxy, sandbox: str, engine: docker.DockerClient, version: str
) -> None:
    """API < 1.24 applied a HostConfig sent with start (dockerd 20.10 still does): privileged + /."""
    body = json.dumps({"Privileged": True, "Binds": ["/:/host:ro"]}).encode()
    raw = exchange(proxy, http("POST", f"{version}/containers/{sandbox}/start", body))
    assert statuses(raw) == [403]
    host = engine.api.inspect_container(sandbox)["HostConfig"]
    assert host["Privileged"] is False and not host["Binds"]


def test_old_api_versions_are_refused(proxy: Proxy) -> None:
    assert statuses(exchange(proxy, http("GET", "/v1.23/_ping"))) == [403]
    assert statuses(exchange(proxy, http("GET", "/v1.40/_ping"))) == [200]


BAD_FRAMING = {
    "chunk size 0x10": b"0x10\r\n",
    "chunk size +10": b"+10\r\n",
    "chunk size with space": b" 10\r\n",
    "chunk size 1_0": b"1_0\r\n",
    "chunk without CRLF": b"2\r\nabcd\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("chunk", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
def test_malformed_chunks_are_refused(proxy: Proxy, chunk: bytes) -> None:
    raw = exchange(proxy, b"POST /containers/create HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    assert statuses(raw) == [400]


BAD_HEADS = {
    "TE and CL": "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "TE not chunked": "Transfer-Encoding: gzip, chunked\r\n",
    "two TE": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "two CL": "Content-Length: 0\r\nContent-Length: 0\r\n",
    "CL +0": "Content-Length: +0\r\n",
    "bare LF in a header": "X-A: b\nTransfer-Encoding: chunked\r\n",
    "folded header": "X-A: b\r\n Transfer-Encoding: chunked\r\n",
    "NUL in a header": "X-A: b\0c\r\n",
}


@pytest.mark.parametrize("headers", BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_ambiguous_framing_is_refused(proxy: Proxy, headers: str) -> None:
    raw = exchange(proxy, f"GET /_ping HTTP/1.1\r\nHost: d\r\n{headers}\r\n".encode() + INFO)
    assert statuses(raw) == [400] and not leaked_info(raw)


def test_absolute_form_and_garbage_request_lines_are_refused(proxy: Proxy) -> None:
    for line in (b"GET http://docker/info HTTP/1.1", b"GET /_ping HTTP/2.0", b"GET  /_ping HTTP/1.1", b"\x16\x03\x01"):
        assert statuses(exchange(proxy, line + b"\r\nHost: d\r\n\r\n")) == [400], line


def test_bodies_over_the_limit_are_refused_unread(proxy: Proxy, engine: docker.DockerClient) -> None:
    ours = {"label": f"{TEST_LABEL}=1"}
    before = {c.id for c in engine.containers.list(all=True, filters=ours)}
    body = json.dumps({**sandbox_body(), "Env": ["X=" + "a" * (1 << 20)]}).encode()
    assert statuses(exchange(proxy, http("POST", "/containers/create", body))) == [413]
    assert statuses(exchange(proxy, http("POST", "/containers/create", body, chunks=[65536] * 20))) == [413]
    head = b"POST /containers/create HTTP/1.1\r\nHost: d\r\nContent-Length: 999999999\r\n\r\n"
    assert statuses(exchange(proxy, head)) == [413]  # answered without waiting for the body
    assert {c.id for c in engine.containers.list(all=True, filters=ours)} == before


@pytest.mark.parametrize("query", ["?link=1&force=1", "?force=1&force=0", "?volumes=1"])
def test_query_parameters_outside_the_allowlist_are_refused(proxy: Proxy, sandbox: str, query: str) -> None:
    assert statuses(exchange(proxy, http("DELETE", f"/v1.41/containers/{sandbox}{query}"))) == [403]
