"""``codeloop doctor`` against the real Redis and Docker engine and model servers on loopback."""

from __future__ import annotations

import io
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import docker
import pytest
import redis

from bot import cli
from runner.config import PROTOCOL
from tests.conftest import REDIS_URL

BASE_IMAGE = "codeloop/base:bookworm"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A loopback HTTP server answering each path with a fixed (status, body)."""

    def __init__(self, routes: dict[str, tuple[int, str]]) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                status, body = routes.get(self.path, (404, "not found"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[type[Server]]:
    made: list[Server] = []

    class Factory(Server):
        def __init__(self, routes: dict[str, tuple[int, str]]) -> None:
            super().__init__(routes)
            made.append(self)

    yield Factory
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def sandbox_image() -> Iterator[str]:
    """A stand-in sandbox image: the base plus the protocol label the runner checks."""
    client = docker.from_env()
    tag = f"codeloop-test-doctor:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {BASE_IMAGE}\nLABEL codeloop.sandbox.protocol={PROTOCOL}\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    yield tag
    client.images.remove(tag, force=True)
    client.close()


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str], str]:
    """Run `codeloop doctor` through the real CLI; returns exit status, status per check, output."""
    code = cli.main(["doctor", "--timeout", "3", *args])
    out = capsys.readouterr().out
    statuses = {line.split()[1]: line.split()[0] for line in out.splitlines() if len(line.split()) > 2}
    return code, statuses, out


@pytest.fixture
def healthy_env(monkeypatch: pytest.MonkeyPatch, sandbox_image: str, http_server: type[Server]) -> Server:
    model = http_server({"/health": (200, "")})
    monkeypatch.setenv("CODELOOP_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("CODELOOP_LLM_URL", model.url)
    monkeypatch.setenv("CODELOOP_SANDBOX_IMAGE", sandbox_image)
    return model


def aof_enabled() -> bool:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return bool(int(client.info("persistence")["aof_enabled"]))
    finally:
        client.close()


def test_everything_reachable_passes(capsys: pytest.CaptureFixture[str], healthy_env: Server) -> None:
    code, statuses, out = doctor(capsys)
    assert code == 0, out
    assert statuses["docker"] == statuses["sandbox"] == statuses["model"] == "ok"
    assert statuses["redis"] == ("ok" if aof_enabled() else "warn")
    assert statuses["slack"] == statuses["discord"] == "skip"
    assert out.rstrip().endswith("All checks passed.")
    assert healthy_env.seen == [("/health", None)]


def test_each_broken_part_is_one_line_with_its_fix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, healthy_env: Server
) -> None:
    monkeypatch.setenv("CODELOOP_REDIS_URL", f"redis://:hunter2@127.0.0.1:{closed_port()}/0")
    monkeypatch.setenv("CODELOOP_LLM_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("CODELOOP_SANDBOX_IMAGE", "codeloop-test-absent:never")
    monkeypatch.setenv("CODELOOP_SLACK_BOT_TOKEN", "xoxb-topsecret")
    code, statuses, out = doctor(capsys)
    assert code == 1
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert [line.split()[1] for line in failures] == ["redis", "sandbox", "model", "slack"]
    assert all(". Fix: " in line for line in failures)
    assert "CODELOOP_REDIS_URL" in failures[0] and "hunter2" not in out and ":***@" in failures[0]
    assert "codeloop sandbox build" in failures[1]
    assert "CODELOOP_LLM_URL" in failures[2]
    assert "CODELOOP_SLACK_APP_TOKEN" in failures[3] and "topsecret" not in out
    assert statuses["docker"] == "ok"
    assert out.rstrip().endswith("4 problem(s).")


def test_unreachable_engine_fails_docker_and_sandbox(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, healthy_env: Server, tmp_path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    code, statuses, out = doctor(capsys, "--only", "docker,sandbox")
    assert code == 1
    assert statuses == {"settings": "ok", "docker": "FAIL", "sandbox": "FAIL"}
    assert "DOCKER_HOST" in out and "no-such.sock" in out


def test_image_without_the_protocol_label_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, healthy_env: Server
) -> None:
    monkeypatch.setenv("CODELOOP_SANDBOX_IMAGE", BASE_IMAGE)
    code, statuses, out = doctor(capsys, "--only", "sandbox")
    assert (code, statuses["sandbox"]) == (1, "FAIL")
    assert "not a sandbox image of this codeloop version" in out and "rebuild" in out


@pytest.mark.parametrize(
    ("routes", "status", "expect"),
    [
        ({"/health": (200, "")}, "ok", "answers /health"),
        # vLLM and other OpenAI-compatible servers have no /health route of TGI's kind
        ({"/v1/models": (200, json.dumps({"data": [{"id": "ds-6.7b"}]}))}, "ok", "serving ds-6.7b"),
        ({"/health": (503, "loading")}, "FAIL", "not ready"),
        ({"/health": (401, "no")}, "FAIL", "CODELOOP_LLM_TOKEN"),
        ({}, "FAIL", "not a TGI or OpenAI-compatible server"),
    ],
)
def test_model_endpoint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, http_server: type[Server],
    routes: dict[str, tuple[int, str]], status: str, expect: str,
) -> None:
    server = http_server(routes)
    monkeypatch.setenv("CODELOOP_LLM_URL", server.url + "/")
    monkeypatch.setenv("CODELOOP_LLM_TOKEN", "tok-123")
    code, statuses, out = doctor(capsys, "--only", "model")
    assert statuses["model"] == status and expect in out, out
    assert code == (0 if status == "ok" else 1)
    assert all(auth == "Bearer tok-123" for _, auth in server.seen) and "tok-123" not in out


@pytest.mark.parametrize(
    ("env", "ok", "expect"),
    [
        ({"CODELOOP_SLACK_BOT_TOKEN": "xoxb-1", "CODELOOP_SLACK_APP_TOKEN": "xapp-1"}, True, "socket mode"),
        ({"CODELOOP_SLACK_BOT_TOKEN": "xoxp-1", "CODELOOP_SLACK_APP_TOKEN": "xapp-1"}, False, "xoxb-"),
        ({"CODELOOP_SLACK_BOT_TOKEN": "xoxb-1", "CODELOOP_SLACK_APP_TOKEN": "xoxb-2"}, False, "xapp-"),
        ({"CODELOOP_SLACK_MODE": "http", "CODELOOP_SLACK_BOT_TOKEN": "xoxb-1"}, False,
         "CODELOOP_SLACK_SIGNING_SECRET"),
        ({"CODELOOP_SLACK_MODE": "http", "CODELOOP_SLACK_BOT_TOKEN": "xoxb-1",
          "CODELOOP_SLACK_SIGNING_SECRET": "abc"}, True, "http mode"),
        ({}, False, "CODELOOP_SLACK_BOT_TOKEN"),
    ],
)
def test_slack_tokens(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                      env: dict[str, str], ok: bool, expect: str) -> None:
    monkeypatch.setenv("CODELOOP_LLM_URL", "http://127.0.0.1:9")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, statuses, out = doctor(capsys, "--only", "slack")
    assert statuses["slack"] == ("ok" if ok else "FAIL") and expect in out, out
    assert code == (0 if ok else 1)


@pytest.mark.parametrize(("token", "ok"), [("MTA.x2.y3", True), ("1234567890", False), (None, False)])
def test_discord_token(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                       token: str | None, ok: bool) -> None:
    monkeypatch.setenv("CODELOOP_LLM_URL", "http://127.0.0.1:9")
    if token:
        monkeypatch.setenv("CODELOOP_DISCORD_TOKEN", token)
    code, statuses, out = doctor(capsys, "--only", "discord")
    assert (code, statuses["discord"]) == ((0, "ok") if ok else (1, "FAIL")), out
    assert token is None or token not in out


def test_bad_settings_are_a_problem_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODELOOP_WORKER_CONCURRENCY", "lots")
    code, statuses, out = doctor(capsys)
    assert (code, statuses) == (1, {"settings": "FAIL"})
    assert "CODELOOP_WORKER_CONCURRENCY" in out and "Fix:" in out


def test_quiet_prints_only_problems_and_unknown_checks_are_rejected(
    capsys: pytest.CaptureFixture[str], healthy_env: Server
) -> None:
    code, _, out = doctor(capsys, "--only", "docker,sandbox,model", "--quiet")
    assert (code, out) == (0, "")
    code, _, out = doctor(capsys, "--only", "dokcer")
    assert code == 2 and "unknown check dokcer" in out
