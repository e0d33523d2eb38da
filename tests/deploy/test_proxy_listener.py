"""Who can reach the proxy: a unix socket by default, TCP only with client-certificate TLS (a
throwaway CA made by deploy/proxy-certs.sh) or an explicit --insecure-tcp; and the deployments
wire it that way (compose: the socket; Kubernetes: TLS between workers and the sandbox engine)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from docker.tls import TLSConfig

from runner.config import SandboxConfig
from runner.manager import SandboxManager
from tests.deploy.conftest import PROXY, ROOT, TEST_LABEL, Proxy, free_port, launch

pytestmark = pytest.mark.docker
SANDBOX_IMAGE = os.environ.get("CODELOOP_TEST_SANDBOX_IMAGE", "codeloop-sandbox:latest")
PING = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"


@pytest.fixture(autouse=True)
def _no_ca_bundle_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the CA the docker SDK passes it
    (DOCKER_CERT_PATH/ca.pem); this machine sets them. Workers must not (docs/DEPLOY.md)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def make_certs(folder: Path) -> Path:
    subprocess.run(["sh", str(ROOT / "deploy/proxy-certs.sh"), str(folder), "127.0.0.1", "localhost"],
                   check=True, capture_output=True, timeout=60)
    return folder


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_proxy(start_proxy: Callable[..., Proxy], certs: Path) -> Proxy:
    server = certs / "server"
    return start_proxy("--tls-cert", str(server / "cert.pem"), "--tls-key", str(server / "key.pem"),
                       "--tls-ca", str(server / "ca.pem"), listen=f"tcp://127.0.0.1:{free_port()}",
                       images=SANDBOX_IMAGE)


def port_of(proxy: Proxy) -> int:
    return int(proxy.address.rpartition(":")[2])


def tls_ping(port: int, ca: Path, cert: tuple[Path, Path] | None) -> bytes:
    """A raw /_ping over TLS; what came back (b"" or an exception's name when refused)."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(PING)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__.encode()


def test_plain_tcp_is_refused_without_an_explicit_opt_in(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    proc = launch(["--listen", f"tcp://127.0.0.1:{free_port()}"], log)
    assert proc.wait(30) == 2
    assert "refusing plain TCP" in log.read_text()
    proc = launch(["--listen", "unix:///tmp/x.sock", "--tls-cert", "c.pem"], log)
    assert proc.wait(30) == 2 and "TLS needs a tcp:// listener" in log.read_text()


def test_insecure_tcp_works_only_when_asked_for_and_says_so(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy("--insecure-tcp", listen=f"tcp://127.0.0.1:{free_port()}")
    with socket.create_connection(("127.0.0.1", port_of(proxy)), timeout=20) as s:
        s.sendall(PING)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    assert "no authentication" in proxy.output()


def test_the_default_listener_is_a_group_only_unix_socket(proxy: Proxy) -> None:
    help_text = subprocess.run([sys.executable, str(PROXY), "--help"], capture_output=True, text=True).stdout
    assert "default unix:///run/codeloop-engine/docker.sock" in " ".join(help_text.split())
    assert stat.S_IMODE(os.stat(proxy.path).st_mode) == 0o660


def test_tls_without_the_right_client_certificate_is_refused(
    tls_proxy: Proxy, certs: Path, tmp_path: Path
) -> None:
    port, ca = port_of(tls_proxy), certs / "client" / "ca.pem"
    assert b"200 OK" not in tls_ping(port, ca, None)
    stranger = make_certs(tmp_path / "stranger") / "client"  # signed by another CA
    assert b"200 OK" not in tls_ping(port, ca, (stranger / "cert.pem", stranger / "key.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:  # no TLS at all
        s.sendall(PING)
        try:
            reply = s.recv(4096)
        except ConnectionError:
            reply = b""
        assert b"200 OK" not in reply
    with pytest.raises(docker.errors.DockerException):  # the docker SDK without a client certificate
        docker.DockerClient(base_url=f"https://127.0.0.1:{port}", timeout=20,
                            tls=TLSConfig(ca_cert=str(ca), verify=True)).ping()
    mine = certs / "client"
    assert tls_ping(port, ca, (mine / "cert.pem", mine / "key.pem")).startswith(b"HTTP/1.1 200")


async def test_a_worker_with_the_client_certificate_runs_sandboxes_through_tls(
    tls_proxy: Proxy, certs: Path
) -> None:
    """What a Kubernetes worker does: DOCKER_HOST/DOCKER_TLS_VERIFY/DOCKER_CERT_PATH, the docker SDK
    for create/start, runner/attach.py's own TLS connection for the attach stream."""
    env = {"DOCKER_HOST": f"tcp://127.0.0.1:{port_of(tls_proxy)}", "DOCKER_TLS_VERIFY": "1",
           "DOCKER_CERT_PATH": str(certs / "client")}
    client = docker.from_env(environment=env, timeout=30)
    config = SandboxConfig(image=SANDBOX_IMAGE, memory="256m", tmp_size="16m", data_size="16m", pool_size=0,
                           labels={TEST_LABEL: "1", "codeloop.test-run": uuid.uuid4().hex[:12]})
    manager = SandboxManager(config, client)
    try:
        await manager.start()
        session, _ = await manager.acquire(None, "tls")
        result = await session.run("import socket; print(socket.gethostname(), 6 * 7)")
        assert result.error is None and result.stdout == "sandbox 42\n"
        await manager.destroy(session.id)
    finally:
        await manager.aclose()
        client.close()


def k8s(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/k8s" / name).read_text()) if d]


def test_kubernetes_wires_client_certificate_tls_between_workers_and_the_engine() -> None:
    engine = next(d for d in k8s("sandbox-engine.yaml") if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    proxy = next(c for c in engine["containers"] if c["name"] == "docker-proxy")
    args = " ".join(proxy["args"])
    assert "--listen tcp://0.0.0.0:2376" in args and "--insecure-tcp" not in args
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        assert flag in proxy["args"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in engine["volumes"] if "secret" in v}
    assert "codeloop-docker-tls-server" in secrets.values()
    config = next(d for d in k8s("config.yaml") if d["kind"] == "ConfigMap")["data"]
    assert config["CODELOOP_SANDBOX_ENGINE_TLS_DIR"] == "/etc/codeloop/docker-tls"  # the engines: test_k8s.py
    assert all(":2376" in entry for entry in config["CODELOOP_SANDBOX_ENGINES"].split(","))
    for worker in (d for d in k8s("worker.yaml") if d["kind"] == "Deployment"):
        spec = worker["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
        assert env["DOCKER_TLS_VERIFY"] == "1" and env["DOCKER_CERT_PATH"] == "/etc/codeloop/docker-tls"
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        volume = next(v for v in spec["volumes"] if v["name"] == mounts["/etc/codeloop/docker-tls"])
        assert volume["secret"]["secretName"] == "codeloop-docker-tls-client"
    policy = next(d for d in k8s("network-policy.yaml") if d["metadata"]["name"] == "sandbox-engine-from-workers")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 2376, "protocol": "TCP"}]


def test_compose_keeps_the_proxy_on_its_unix_socket() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    proxy = compose["services"]["docker-proxy"]
    assert proxy["command"][:2] == ["--listen", "unix:///run/codeloop-engine/docker.sock"]
    assert "ports" not in proxy and "--insecure-tcp" not in proxy["command"]
