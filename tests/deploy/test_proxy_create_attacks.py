"""Create bodies that smuggle settings past a proxy that checks keys by their exact spelling.

dockerd matches JSON field names case-insensitively and the last match wins: each body below is a
valid hardened sandbox plus one extra or repeated field. Every one must be refused with no
container made; a body in another casing but without tricks is accepted and made canonical.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from runner.hardening import security_opt
from tests.deploy.conftest import TEST_LABEL, Proxy, exchange, http, sandbox_body, statuses, to_obj, with_pairs

pytestmark = pytest.mark.docker
OTHER_IMAGE = os.environ.get("CODELOOP_TEST_SANDBOX_IMAGE", "codeloop-sandbox:latest")
ALLOW_ALL = json.dumps({"defaultAction": "SCMP_ACT_ALLOW"})


@pytest.fixture
def no_new_container(engine: docker.DockerClient) -> Iterator[None]:
    ours = {"label": f"{TEST_LABEL}=1"}
    before = {c.id for c in engine.containers.list(all=True, filters=ours)}
    yield
    assert {c.id for c in engine.containers.list(all=True, filters=ours)} == before


def create(proxy: Proxy, body: bytes, **kw: Any) -> tuple[int, bytes]:
    raw = exchange(proxy, http("POST", "/v1.41/containers/create", body, **kw))
    return statuses(raw)[0], raw


def replaced(where: str, key: str, value: Any) -> bytes:
    """The sandbox body with ``key`` of the object at ``where`` set to ``value`` (same spelling)."""
    body = sandbox_body()
    (body[where] if where else body)[key] = value
    return json.dumps(body).encode()


ATTACKS: dict[str, bytes] = {
    # 1: the same field again in another case; the engine keeps the last one
    "lower-case user root": with_pairs(sandbox_body(), "", ("user", "0")),
    "lower-case image": with_pairs(sandbox_body(), "", ("image", OTHER_IMAGE)),
    "lower-case binds": with_pairs(sandbox_body(), "HostConfig", ("binds", ["/:/host"])),
    "lower-case pidmode": with_pairs(sandbox_body(), "HostConfig", ("pidmode", "host")),
    "lower-case privileged": with_pairs(sandbox_body(), "HostConfig", ("privileged", True)),
    "second hostconfig": with_pairs(
        sandbox_body(), "", ("hostconfig", {**sandbox_body()["HostConfig"], "Privileged": True, "Binds": ["/:/h"]})
    ),
    "exact duplicate User": with_pairs(sandbox_body(), "", ("User", "0:0")),
    "duplicate Memory": with_pairs(sandbox_body(), "HostConfig", ("Memory", 1 << 40)),
    "unicode fold of User": with_pairs(sandbox_body(), "", ("uſer", "0")),  # Go folds ſ to s
    "top-level Binds": with_pairs(sandbox_body(), "", ("Binds", ["/:/host"])),
    "unknown HostConfig field": with_pairs(sandbox_body(), "HostConfig", ("CpuShares", 262144)),
    # the lesser ones: values a key-by-key check let through
    "User 00": replaced("", "User", "00"),
    "User +0": replaced("", "User", "+0"),
    "User root": replaced("", "User", "root"),
    "User uid:0": replaced("", "User", "10001:0"),
    "User below the range": replaced("", "User", "1000:1000"),
    "no User": json.dumps({k: v for k, v in sandbox_body().items() if k != "User"}).encode(),
    "GroupAdd 0": replaced("HostConfig", "GroupAdd", ["0"]),
    "inline allow-all seccomp": replaced("HostConfig", "SecurityOpt", ["no-new-privileges", f"seccomp={ALLOW_ALL}"]),
    "seccomp left out": replaced("HostConfig", "SecurityOpt", ["no-new-privileges"]),
    "apparmor unconfined added": replaced("HostConfig", "SecurityOpt", [*security_opt(), "apparmor=unconfined"]),
    "LogConfig json-file": replaced("HostConfig", "LogConfig", {"Type": "json-file", "Config": {}}),
    "LogConfig left out": json.dumps(
        {**sandbox_body(), "HostConfig": {k: v for k, v in sandbox_body()["HostConfig"].items() if k != "LogConfig"}}
    ).encode(),
    "huge Memory": replaced("HostConfig", "Memory", 1 << 40),
    "huge MemorySwap": replaced("HostConfig", "MemorySwap", 1 << 40),
    "unlimited pids": replaced("HostConfig", "PidsLimit", -1),
    "huge NanoCpus": replaced("HostConfig", "NanoCpus", 64 * 10**9),
    "negative OomScoreAdj": replaced("HostConfig", "OomScoreAdj", -1000),
    "MaskedPaths emptied": replaced("HostConfig", "MaskedPaths", []),
    "tmpfs over /proc": replaced("HostConfig", "Tmpfs", {"/proc": "size=1m"}),
    "tmpfs without size": replaced("HostConfig", "Tmpfs", {"/tmp": "rw,exec"}),
    "rtprio ulimit": replaced("HostConfig", "Ulimits", [{"Name": "rtprio", "Soft": 99, "Hard": 99}]),
    "restart always": replaced("HostConfig", "RestartPolicy", {"Name": "always", "MaximumRetryCount": 0}),
    "runtime not allowed": replaced("HostConfig", "Runtime", "io.containerd.runc.v2"),
    "Memory as float": replaced("HostConfig", "Memory", 134217728.0),
}


@pytest.mark.usefixtures("no_new_container")
@pytest.mark.parametrize("body", ATTACKS.values(), ids=ATTACKS.keys())
def test_smuggled_create_settings_are_refused(proxy: Proxy, body: bytes) -> None:
    status, raw = create(proxy, body)
    assert status == 403, raw
    assert b"codeloop-docker-proxy: denied" in raw


@pytest.mark.usefixtures("no_new_container")
@pytest.mark.parametrize("body", [b"[]", b'{"Image": NaN}', b"\xff\xfe{}", b"[" * 100_000, b"{" * 50_000, b"{}"])
def test_garbage_bodies_are_refused(proxy: Proxy, body: bytes) -> None:
    assert create(proxy, body)[0] == 403


def test_other_casing_is_accepted_and_forwarded_canonically(proxy: Proxy, engine: docker.DockerClient) -> None:
    """Without duplicates, ``hostCONFIG``/``user`` are the engine's HostConfig/User: fine, and what
    the engine receives is the proxy's own canonical body."""

    def recase(value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # an Obj
            maps = ("Labels", "Tmpfs")  # map keys are data, not field names
            return type(value)((k if k in maps else k.swapcase(), v if k in maps else recase(v)) for k, v in value)
        return [recase(v) for v in value] if isinstance(value, list) else value

    from tests.deploy.conftest import dumps

    status, raw = create(proxy, dumps(recase(to_obj(sandbox_body()))).encode(), chunks=[7, 100, 1])
    assert status == 201, raw
    cid = json.loads(raw.partition(b"\r\n\r\n")[2].split(b"\r\n")[1] if b"chunked" in raw.lower() else
                     raw.partition(b"\r\n\r\n")[2])["Id"]
    try:
        attrs = engine.api.inspect_container(cid)
        assert attrs["Config"]["User"] == "10001:10001"
        assert attrs["HostConfig"]["SecurityOpt"] == security_opt()
        assert attrs["HostConfig"]["Memory"] == 128 * 1024**2 and attrs["HostConfig"]["ReadonlyRootfs"] is True
    finally:
        engine.api.remove_container(cid, force=True)


def test_a_uid_alone_gets_its_own_gid_not_root(proxy: Proxy, engine: docker.DockerClient) -> None:
    status, raw = create(proxy, replaced("", "User", "10001"))
    assert status == 201, raw
    cid = json.loads(raw.partition(b"\r\n\r\n")[2])["Id"]
    try:
        assert engine.api.inspect_container(cid)["Config"]["User"] == "10001:10001"
    finally:
        engine.api.remove_container(cid, force=True)
