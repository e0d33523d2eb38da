"""``codeloop doctor`` against the real Redis and Docker engine and model servers on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import pytest
import redis
import yaml

from bot import cli
from bot.core.settings import DEFAULT_MODEL
from bot.ops.doctor_http import SLACK_SCOPES
from runner.config import PROTOCOL
from tests.conftest import REDIS_URL
from tests.deploy.images import base_image
from tests.fakes.discord_gateway import GatewayDiscord
from tests.fakes.model_server import ScriptedModelServer
from tests.fakes.slack_server import MANIFEST_SCOPES, ScopedSlackAPI

BASE_IMAGE = base_image()


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
    model = http_server({"/health": (200, ""), "/info": (200, json.dumps({"model_id": DEFAULT_MODEL}))})
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
    assert healthy_env.seen == [("/health", None), ("/info", None)]


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


def _tgi(model: str) -> tuple[int, str]:
    return 200, json.dumps({"model_id": model, "router": "text-generation-router"})


def _models(*names: str) -> tuple[int, str]:
    return 200, json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})


@pytest.mark.parametrize(
    ("routes", "status", "expect"),
    [
        ({"/health": (200, ""), "/info": _tgi(DEFAULT_MODEL)}, "ok", f"serves {DEFAULT_MODEL}"),
        # TGI answers under any model name: a mismatch works, but the operator should know
        ({"/health": (200, ""), "/info": _tgi("m-a-p/OpenCodeInterpreter-DS-6.7B")}, "warn",
         "set CODELOOP_MODEL=m-a-p/OpenCodeInterpreter-DS-6.7B"),
        # vLLM and other OpenAI-compatible servers have no /info: the name must be one /v1/models lists
        ({"/health": (200, ""), "/v1/models": _models(DEFAULT_MODEL)}, "ok", f"serves {DEFAULT_MODEL}"),
        ({"/v1/models": _models("ds-6.7b", "ds-33b")}, "FAIL", "it serves: ds-6.7b, ds-33b"),
        ({"/health": (200, "")}, "warn", "lists no models"),
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
    assert code == (1 if status == "FAIL" else 0)
    assert all(auth == "Bearer tok-123" for _, auth in server.seen) and "tok-123" not in out


async def adoctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str], str]:
    """``doctor`` from a thread, so the fakes keep serving on this test's event loop."""
    return await asyncio.to_thread(doctor, capsys, *args)


@pytest.fixture
async def slack_api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ScopedSlackAPI]:
    fake = await ScopedSlackAPI().start()
    monkeypatch.setenv("CODELOOP_SLACK_API_URL", fake.api_url)
    monkeypatch.setenv("CODELOOP_SLACK_BOT_TOKEN", fake.token)
    monkeypatch.setenv("CODELOOP_SLACK_APP_TOKEN", fake.app_token)
    yield fake
    await fake.close()


@pytest.mark.parametrize(
    ("env", "ok", "expect"),
    [
        ({"CODELOOP_SLACK_BOT_TOKEN": "xoxp-1"}, False, "xoxb-"),
        ({"CODELOOP_SLACK_APP_TOKEN": "xoxb-2"}, False, "xapp-"),
        ({"CODELOOP_SLACK_MODE": "http", "CODELOOP_SLACK_APP_TOKEN": ""}, False, "CODELOOP_SLACK_SIGNING_SECRET"),
        ({"CODELOOP_SLACK_MODE": "http", "CODELOOP_SLACK_SIGNING_SECRET": "abc"}, True,
         "bot @codeloop (UBOT) in team Fake, scopes complete; HTTP mode"),
        ({}, True, "bot @codeloop (UBOT) in team Fake, scopes complete; app token opens Socket Mode"),
        ({"CODELOOP_SLACK_BOT_TOKEN": ""}, False, "CODELOOP_SLACK_BOT_TOKEN"),
        ({"CODELOOP_SLACK_BOT_TOKEN": "xoxb-not-this-one"}, False,
         "Slack rejected CODELOOP_SLACK_BOT_TOKEN (invalid_auth on auth.test)"),
        ({"CODELOOP_SLACK_APP_TOKEN": "xapp-not-this-one"}, False,
         "Slack rejected CODELOOP_SLACK_APP_TOKEN (invalid_auth on apps.connections.open)"),
    ],
)
async def test_slack_tokens_are_asked_of_slack(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                               slack_api: ScopedSlackAPI, env: dict[str, str], ok: bool,
                                               expect: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, statuses, out = await adoctor(capsys, "--only", "slack")
    assert statuses["slack"] == ("ok" if ok else "FAIL") and expect in out, out
    assert code == (0 if ok else 1)
    assert "not-this-one" not in out and slack_api.token not in out


async def test_a_revoked_slack_token_fails(capsys: pytest.CaptureFixture[str], slack_api: ScopedSlackAPI) -> None:
    slack_api.revoked.add(slack_api.token)
    code, statuses, out = await adoctor(capsys, "--only", "slack")
    assert (code, statuses["slack"]) == (1, "FAIL")
    assert "Slack rejected CODELOOP_SLACK_BOT_TOKEN (token_revoked on auth.test). Fix: " in out


async def test_missing_slack_scopes_are_named(capsys: pytest.CaptureFixture[str], slack_api: ScopedSlackAPI) -> None:
    slack_api.scopes = [s for s in slack_api.scopes if s not in ("files:write", "commands")]
    code, statuses, out = await adoctor(capsys, "--only", "slack")
    assert (code, statuses["slack"]) == (1, "FAIL")
    assert "lacks the scopes commands, files:write" in out and "reinstall" in out


def test_the_scopes_the_doctor_wants_are_the_manifests() -> None:
    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "slack-manifest.yml").read_text())
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == SLACK_SCOPES == set(MANIFEST_SCOPES)


def test_unreachable_slack_is_a_failure(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODELOOP_SLACK_API_URL", f"http://127.0.0.1:{closed_port()}/api/")
    monkeypatch.setenv("CODELOOP_SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("CODELOOP_SLACK_APP_TOKEN", "xapp-1")
    code, statuses, out = doctor(capsys, "--only", "slack")
    assert (code, statuses["slack"]) == (1, "FAIL") and "not reachable" in out


@pytest.fixture
async def discord_api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GatewayDiscord]:
    fake = await GatewayDiscord(token="MTA.fake.token").start()
    monkeypatch.setenv("CODELOOP_DISCORD_API_URL", fake.api_url)
    monkeypatch.setenv("CODELOOP_DISCORD_TOKEN", fake.token)
    yield fake
    await fake.close()


async def test_discord_token_and_command_are_asked_of_discord(capsys: pytest.CaptureFixture[str],
                                                              discord_api: GatewayDiscord) -> None:
    code, statuses, out = await adoctor(capsys, "--only", "discord")
    assert (code, statuses["discord"]) == (0, "warn") and "codeloop discord --sync" in out, out
    discord_api.commands = [{"id": "1", "name": "code", "type": 1}]
    code, statuses, out = await adoctor(capsys, "--only", "discord")
    assert (code, statuses["discord"]) == (0, "ok"), out
    assert f"bot codeloop ({discord_api.application_id}), /code registered" in out
    assert discord_api.token not in out


async def test_a_rejected_discord_token_fails(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             discord_api: GatewayDiscord) -> None:
    monkeypatch.setenv("CODELOOP_DISCORD_TOKEN", "MTA.revoked.token")
    code, statuses, out = await adoctor(capsys, "--only", "discord")
    assert (code, statuses["discord"]) == (1, "FAIL")
    assert "Discord rejected CODELOOP_DISCORD_TOKEN (401 on /users/@me)" in out and "revoked" not in out


@pytest.mark.parametrize("token", ["1234567890", None])
def test_discord_token_shape(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             token: str | None) -> None:
    monkeypatch.setenv("CODELOOP_LLM_URL", "http://127.0.0.1:9")
    if token:
        monkeypatch.setenv("CODELOOP_DISCORD_TOKEN", token)
    code, statuses, out = doctor(capsys, "--only", "discord")
    assert (code, statuses["discord"]) == (1, "FAIL"), out
    assert token is None or token not in out


async def test_a_model_name_the_server_does_not_serve_fails(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the scripted server acting like vLLM: it serves exactly one name."""
    server = await ScriptedModelServer(served_model="ds-6.7b").start()
    monkeypatch.setenv("CODELOOP_LLM_URL", server.url)
    try:
        code, statuses, out = await adoctor(capsys, "--only", "model")
        assert (code, statuses["model"]) == (1, "FAIL")
        assert f"does not serve '{DEFAULT_MODEL}' (CODELOOP_MODEL); it serves: ds-6.7b" in out
        monkeypatch.setenv("CODELOOP_MODEL", "ds-6.7b")
        code, statuses, out = await adoctor(capsys, "--only", "model")
        assert (code, statuses["model"]) == (0, "ok") and "serves ds-6.7b" in out
    finally:
        await server.stop()


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


async def test_each_model_profile_is_checked_like_the_default_model(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """CODELOOP_MODEL_PROFILES: one line per profile, failing where the server does not serve its name."""
    default = await ScriptedModelServer().start()  # TGI-like
    big = await ScriptedModelServer(served_model="ds-33b").start()  # vLLM-like: serves one name
    monkeypatch.setenv("CODELOOP_LLM_URL", default.url)
    monkeypatch.setenv("CODELOOP_MODEL", "scripted")
    try:
        monkeypatch.setenv("CODELOOP_MODEL_PROFILES", f"fast={default.url},big={big.url}|ds-33b")
        code, statuses, out = await adoctor(capsys, "--only", "model")
        assert (code, statuses["model"], statuses["model:fast"], statuses["model:big"]) == (0, "ok", "ok", "ok"), out
        assert f"{big.url} serves ds-33b" in out
        monkeypatch.setenv("CODELOOP_MODEL_PROFILES", f"big={big.url}|ds-6.7b,gone=http://127.0.0.1:{closed_port()}")
        code, statuses, out = await adoctor(capsys, "--only", "model")
        assert (code, statuses["model"], statuses["model:big"], statuses["model:gone"]) == (1, "ok", "FAIL", "FAIL")
        assert ("does not serve 'ds-6.7b' (the name after '|' in profile big in CODELOOP_MODEL_PROFILES); "
                "it serves: ds-33b") in out
        assert "or set profile gone in CODELOOP_MODEL_PROFILES" in out
    finally:
        await default.stop()
        await big.stop()
