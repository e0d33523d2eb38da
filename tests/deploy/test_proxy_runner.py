"""The real runner through the real proxy: the body runner/config.py sends passes the allowlist,
and the container the engine made from the proxy's rebuilt body is the sandbox the runner asked for."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable

import docker
import pytest

from runner.config import SandboxConfig
from runner.hardening import security_opt
from runner.manager import SandboxManager
from tests.deploy.conftest import TEST_LABEL, Proxy

pytestmark = pytest.mark.docker
SANDBOX_IMAGE = os.environ.get("CODELOOP_TEST_SANDBOX_IMAGE", "codeloop-sandbox:latest")


@pytest.fixture(scope="module")
def sandbox_proxy(start_proxy: Callable[..., Proxy], engine: docker.DockerClient) -> Proxy:
    try:
        engine.images.get(SANDBOX_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"sandbox image {SANDBOX_IMAGE} missing: run `codeloop sandbox build`")
    return start_proxy(images=SANDBOX_IMAGE)


def config(**overrides: object) -> SandboxConfig:
    values: dict[str, object] = {
        "image": SANDBOX_IMAGE, "cell_timeout_s": 5.0, "memory": "256m", "tmp_size": "16m",
        "data_size": "16m", "pool_size": 0, "idle_ttl_s": 300.0,
        "labels": {TEST_LABEL: "1", "codeloop.test-run": uuid.uuid4().hex[:12]},
    }
    values.update(overrides)
    return SandboxConfig(**values)  # type: ignore[arg-type]


async def test_the_runner_creates_and_uses_a_sandbox_through_the_proxy(
    sandbox_proxy: Proxy, engine: docker.DockerClient
) -> None:
    client = sandbox_proxy.client()
    manager = SandboxManager(config(pool_size=1, pool_claim_ttl_s=60.0), client)
    try:
        await manager.start()
        await asyncio.wait_for(manager.wait_pool(), 60)  # a warm container: create, attach, start, ping
        session, note = await manager.acquire(None, "through-the-proxy")  # from the pool, renamed
        assert note is None
        await session.put_file("in.txt", b"21")
        result = await session.run("print(int(open('in.txt').read()) * 2)")
        assert result.error is None and result.stdout == "42\n"
        again, _ = await SandboxManager(config(), client).acquire(session.id, "reattach")  # inspect + attach
        assert again.id == session.id and (await again.run("6 * 7")).results[0].text == "42"
        await again.detach()

        attrs = engine.api.inspect_container(session.id)  # what the engine made of the proxy's body
        host = attrs["HostConfig"]
        assert host["SecurityOpt"] == security_opt()
        uid, _, gid = attrs["Config"]["User"].partition(":")
        assert uid == gid and int(uid) >= 1 << 20 and host["Privileged"] is False  # a per-session uid
        assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert host["LogConfig"] == {"Type": "none", "Config": {}}
        assert host["Memory"] == host["MemorySwap"] == 256 * 1024**2 and host["PidsLimit"] == 128
        assert host["Binds"] in (None, []) and host["GroupAdd"] in (None, [])
        assert set(host["Tmpfs"]) == {"/tmp", "/mnt/data"}
        await manager.destroy(session.id)
        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(session.id)
    finally:
        await manager.aclose()
        client.close()
