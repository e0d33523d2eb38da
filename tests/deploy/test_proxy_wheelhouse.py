"""The one bind mount the docker proxy allows: the operator's wheelhouse, read-only, at
/opt/wheelhouse, and only when the proxy is configured with it. Everything else stays refused."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from deploy.docker_proxy_policy import CreatePolicy
from tests.deploy.conftest import TEST_LABEL, Proxy, exchange, http, sandbox_body, statuses, with_pairs

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def wheelhouse() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="codeloop-wh-") as path:
        yield path


@pytest.fixture(scope="module")
def wh_proxy(start_proxy: Callable[..., Proxy], wheelhouse: str) -> Proxy:
    return start_proxy("--wheelhouse", wheelhouse)


@pytest.fixture
def no_new_container(engine: docker.DockerClient) -> Iterator[None]:
    ours = {"label": f"{TEST_LABEL}=1"}
    before = {c.id for c in engine.containers.list(all=True, filters=ours)}
    yield
    assert {c.id for c in engine.containers.list(all=True, filters=ours)} == before


def with_binds(binds: Any) -> bytes:
    body = sandbox_body()
    body["HostConfig"]["Binds"] = binds
    return json.dumps(body).encode()


def create(proxy: Proxy, body: bytes) -> tuple[int, bytes]:
    raw = exchange(proxy, http("POST", "/v1.41/containers/create", body))
    return statuses(raw)[0], raw


def attacks(wh: str) -> dict[str, bytes]:
    ok = f"{wh}:/opt/wheelhouse:ro"
    return {
        "read-write": with_binds([f"{wh}:/opt/wheelhouse:rw"]),
        "no mode (read-write)": with_binds([f"{wh}:/opt/wheelhouse"]),
        "another source": with_binds(["/etc:/opt/wheelhouse:ro"]),
        "a parent of it": with_binds([f"{Path(wh).parent!s}:/opt/wheelhouse:ro"]),
        "a path through it": with_binds([f"{wh}/../..:/opt/wheelhouse:ro"]),
        "another target": with_binds([f"{wh}:/usr/lib:ro"]),
        "propagation flags": with_binds([f"{ok},rshared"]),
        "twice": with_binds([ok, ok]),
        "plus the docker socket": with_binds([ok, "/var/run/docker.sock:/s:ro"]),
        "an object": with_binds({"src": wh}),
        "lower-case binds after it": with_pairs(json.loads(with_binds([ok])), "HostConfig", ("binds", ["/:/h"])),
        "a bind in Mounts": json.dumps({**sandbox_body(), "HostConfig": {**sandbox_body()["HostConfig"], "Mounts": [
            {"Type": "bind", "Source": wh, "Target": "/opt/wheelhouse", "ReadOnly": True}]}}).encode(),
    }


@pytest.mark.usefixtures("no_new_container")
def test_wheelhouse_lookalikes_are_refused(wh_proxy: Proxy, wheelhouse: str) -> None:
    for name, body in attacks(wheelhouse).items():
        status, raw = create(wh_proxy, body)
        assert status == 403 and b"codeloop-docker-proxy: denied" in raw, name


@pytest.mark.usefixtures("no_new_container")
def test_without_a_configured_wheelhouse_no_bind_passes(proxy: Proxy, wheelhouse: str) -> None:
    status, raw = create(proxy, with_binds([f"{wheelhouse}:/opt/wheelhouse:ro"]))
    assert status == 403 and b"no wheelhouse configured" in raw


def test_the_configured_wheelhouse_read_only_is_allowed(
    wh_proxy: Proxy, engine: docker.DockerClient, wheelhouse: str
) -> None:
    status, raw = create(wh_proxy, with_binds([f"{wheelhouse}:/opt/wheelhouse:ro"]))
    assert status == 201, raw
    cid = json.loads(raw.partition(b"\r\n\r\n")[2])["Id"]
    try:
        mounts = engine.api.inspect_container(cid)["Mounts"]
        assert [(m["Type"], m["Source"], m["Destination"], m["RW"]) for m in mounts if m["Type"] == "bind"] == [
            ("bind", wheelhouse, "/opt/wheelhouse", False)
        ]
    finally:
        engine.api.remove_container(cid, force=True)


@pytest.mark.parametrize("path", ["relative/wh", "/srv/../etc", "/srv/wh:/x", "/", "/srv/./wh", "/srv/w h"])
def test_a_wheelhouse_that_is_not_a_plain_path_is_refused_at_start(path: str) -> None:
    with pytest.raises(ValueError):
        CreatePolicy({}, wheelhouse=path)
