"""deploy/docker_proxy.py against the real engine: what a sandbox needs passes, the rest is 403.

The proxy runs as a subprocess on a unix socket (as in compose); the allowed "sandbox image" is
the local base image, which every machine that builds codeloop images has (tests/deploy/conftest.py).
"""

from __future__ import annotations

import socket
import struct
import uuid
from collections.abc import Callable
from typing import Any

import docker
import pytest
from docker.errors import APIError
from docker.types import LogConfig, Mount

from runner.hardening import security_opt
from tests.deploy.conftest import BASE_IMAGE as IMAGE
from tests.deploy.conftest import TEST_LABEL

pytestmark = pytest.mark.docker
LABEL = {"codeloop.session": "1"}


def hardened(**changes: Any) -> dict[str, Any]:
    """The keyword arguments the runner uses for a sandbox, with ``changes`` applied."""
    kwargs: dict[str, Any] = dict(
        image=IMAGE, command=["cat"], user="10001:10001", stdin_open=True, network_mode="none",
        read_only=True, tmpfs={"/tmp": "size=16m"}, cap_drop=["ALL"], security_opt=security_opt(),
        pids_limit=64, mem_limit="128m", memswap_limit="128m", nano_cpus=500_000_000,
        log_config=LogConfig(type="none"), labels={**LABEL, TEST_LABEL: "1"},
    )
    kwargs.update(changes)
    return {k: v for k, v in kwargs.items() if v is not None}


def test_ping_version_and_sandbox_image(proxied: docker.DockerClient) -> None:
    assert proxied.ping() is True
    assert proxied.version()["ApiVersion"]
    assert proxied.images.get(IMAGE).id.startswith("sha256:")


def test_hardened_sandbox_lifecycle_and_attach_stream(proxied: docker.DockerClient) -> None:
    container = proxied.containers.create(**hardened())
    try:
        sock = container.attach_socket(params={"stdin": 1, "stdout": 1, "stream": 1})
        raw = sock._sock
        container.start()
        raw.sendall(b"ping through the proxy\n")
        header = _read_exact(raw, 8)  # docker's multiplexed frame: stream, 0, 0, 0, size
        assert header[0] == 1
        (size,) = struct.unpack(">I", header[4:])
        assert _read_exact(raw, size) == b"ping through the proxy\n"
        raw.close()
        assert container.id in [c.id for c in proxied.containers.list(all=True)]
        container.reload()
        assert container.status == "running"
        container.kill()
    finally:
        container.remove(force=True)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "attach stream closed early"
        data += chunk
    return data


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"privileged": True}, "Privileged"),
        ({"volumes": {"/": {"bind": "/host", "mode": "rw"}}}, "Volumes must be empty"),
        ({"mounts": [Mount("/host", "/", type="bind")]}, "only tmpfs mounts"),
        ({"network_mode": "bridge"}, "NetworkMode"),
        ({"network_mode": "host"}, "NetworkMode"),
        ({"read_only": False}, "ReadonlyRootfs"),
        ({"cap_drop": None}, "CapDrop"),
        ({"cap_add": ["SYS_ADMIN"]}, "CapAdd"),
        ({"security_opt": ["seccomp=unconfined", "no-new-privileges"]}, "SecurityOpt must be exactly codeloop's"),
        ({"security_opt": None}, "SecurityOpt is required"),
        ({"pid_mode": "host"}, "PidMode"),
        ({"user": "0"}, "never run as root"),
        ({"labels": {"other": "1"}}, "label"),
        ({"pids_limit": None}, "PidsLimit"),
        ({"devices": ["/dev/kmsg:/dev/kmsg"]}, "Devices"),
        ({"image": "codeloop-not-allowed:latest"}, "not an allowed sandbox image"),
    ],
)
def test_unsafe_create_is_refused_with_the_reason(
    proxied: docker.DockerClient, engine: docker.DockerClient, changes: dict[str, Any], reason: str
) -> None:
    ours = {"label": f"{TEST_LABEL}=1"}  # other tests share the engine: count only ours
    before = {c.id for c in engine.containers.list(all=True, filters=ours)}
    with pytest.raises(APIError) as info:
        proxied.containers.create(**hardened(**{"labels": {**LABEL, TEST_LABEL: "1"}, **changes}))
    assert info.value.response is not None and info.value.response.status_code == 403
    assert reason in str(info.value)
    assert {c.id for c in engine.containers.list(all=True, filters=ours)} == before


def test_other_containers_are_invisible_and_untouchable(
    proxied: docker.DockerClient, engine: docker.DockerClient
) -> None:
    name = f"codeloop-test-foreign-{uuid.uuid4().hex[:8]}"
    foreign = engine.containers.create(IMAGE, ["sleep", "30"], name=name, labels={TEST_LABEL: "1"},
                                       environment={"SECRET": "s3cret"})
    try:
        assert foreign.id not in [c.id for c in proxied.containers.list(all=True)]
        # a caller's own label filter cannot widen the list either
        listed = proxied.containers.list(all=True, filters={"label": f"{TEST_LABEL}=1"})
        assert foreign.id not in [c.id for c in listed]
        attempts: list[Callable[[], object]] = [
            lambda: proxied.containers.get(name),  # inspect would show its environment
            lambda: proxied.api.start(foreign.id),
            lambda: proxied.api.kill(foreign.id),
            lambda: proxied.api.remove_container(foreign.id, force=True),
            lambda: proxied.api.attach_socket(foreign.id, params={"stdout": 1, "stream": 1}),
            lambda: proxied.api.exec_create(foreign.id, ["id"]),
        ]
        for attempt in attempts:
            with pytest.raises(APIError) as info:
                attempt()
            assert "codeloop-docker-proxy: denied" in str(info.value)
        assert engine.containers.get(foreign.id).status == "created"
    finally:
        foreign.remove(force=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.images.pull("codeloop/base", tag="bookworm"),
        lambda c: c.images.get("codeloop-not-allowed:latest"),
        lambda c: c.networks.list(),
        lambda c: c.volumes.create("codeloop-test-volume"),
        lambda c: c.api.get_archive("whatever", "/etc/passwd"),
        lambda c: c.info(),
    ],
)
def test_api_calls_sandboxes_do_not_need_are_refused(
    proxied: docker.DockerClient, call: Callable[[docker.DockerClient], object]
) -> None:
    with pytest.raises(APIError) as info:
        call(proxied)
    assert "codeloop-docker-proxy: denied" in str(info.value)


def test_binds_without_declared_volumes_are_refused(proxied: docker.DockerClient) -> None:
    """The low-level API can send HostConfig.Binds alone; the body check must still see it."""
    api = proxied.api
    host_config = api.create_host_config(
        binds=["/:/host:rw"], network_mode="none", read_only=True, cap_drop=["ALL"],
        security_opt=security_opt(), pids_limit=64, mem_limit="128m", memswap_limit="128m", nano_cpus=10**9,
        log_config=LogConfig(type="none"),
    )
    with pytest.raises(APIError) as info:
        api.create_container(IMAGE, ["true"], user="10001", labels={**LABEL, TEST_LABEL: "1"}, host_config=host_config)
    assert "a sandbox may bind-mount nothing" in str(info.value)
