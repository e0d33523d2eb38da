"""Downloads of users' uploads (bot/worker/downloads.py), attacked over real HTTP on loopback: the Slack
token goes only over https to Slack's file hosts (or a test host listed explicitly), Discord
downloads only come from Discord's CDN, no redirect leaves the origin, no private address is
reached even through a platform's own host name, and a body is cut at the limit while it streams.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from bot.core.errors import DownloadRefused, InputRejected
from bot.core.jobs import Attachment
from bot.core.settings import Settings
from bot.worker.downloads import Downloader, DownloadPolicy, _PublicOnlyResolver, is_public

TOKEN = "xoxb-download-test"


class FileServer:
    """A loopback HTTP server that records who asked for what, with which Authorization."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.base = ""
        self.redirect_to = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1") -> FileServer:
        app = web.Application()
        app.router.add_get("/file", self._file)
        app.router.add_get("/same", self._same)
        app.router.add_get("/away", self._away)
        app.router.add_get("/big", self._big)
        app.router.add_get("/declared", self._declared)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://{host}:{self.port}"
        return self

    @property
    def test_host(self) -> str:
        return self.base.removeprefix("http://")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _seen(self, request: web.Request) -> None:
        self.requests.append((request.path, request.headers.get("Authorization")))

    async def _file(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"a,b\n1,2\n", content_type="text/csv")

    async def _same(self, request: web.Request) -> web.Response:
        self._seen(request)
        raise web.HTTPFound("/file")

    async def _away(self, request: web.Request) -> web.Response:
        self._seen(request)
        raise web.HTTPFound(self.redirect_to)

    async def _big(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()  # no Content-Length: only counting the stream can stop it
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 32768)
        await resp.write_eof()
        return resp

    async def _declared(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"x" * 2 * 1024 * 1024)


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    started: list[FileServer] = []

    async def start(host: str = "127.0.0.1") -> FileServer:
        started.append(await FileServer().start(host))
        return started[-1]

    yield start
    for server in started:
        await server.close()


def settings_for(make_settings: Callable[..., Settings], *test_hosts: str, **extra: Any) -> Settings:
    return make_settings(slack_bot_token=TOKEN, download_test_hosts=",".join(test_hosts),
                         max_upload_bytes=1024 * 1024, **extra)


async def fetch(settings: Settings, url: str, auth: str = "slack", resolver: AbstractResolver | None = None) -> bytes:
    att = Attachment(name="a.csv", size=8, mime="text/csv", url=url, auth=auth)  # type: ignore[arg-type]
    async with Downloader(settings, resolver) as downloader:
        return await downloader.fetch(att)


# --- which URLs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("auth", "url", "allowed"), [
    ("slack", "https://files.slack.com/files-pri/T1-F1/data.csv", True),
    ("slack", "https://FILES.SLACK.COM/files-pri/T1-F1/data.csv", True),
    ("slack", "https://slack.com/files-pri/x", True),  # the configured API host: https, a Slack domain
    ("slack", "http://files.slack.com/files-pri/T1-F1/data.csv", False),  # the token never goes over http
    ("slack", "https://files.slack.com:8443/x", False),
    ("slack", "https://files.slack.com.evil.example/x", False),
    ("slack", "https://evil.example/files.slack.com/x", False),
    ("slack", "https://user:pw@files.slack.com/x", False),
    ("slack", "https://127.0.0.1/x", False),
    ("slack", "http://localhost:8080/x", False),  # no loopback exception
    ("slack", "ftp://files.slack.com/x", False),
    ("slack", "not a url", False),
    ("discord", "https://cdn.discordapp.com/attachments/1/2/a.csv?ex=1&is=2&hm=3", True),
    ("discord", "https://media.discordapp.net/attachments/1/2/a.png", True),
    ("discord", "http://cdn.discordapp.com/attachments/1/2/a.csv", False),
    ("discord", "https://cdn.discordapp.com.evil.example/a.csv", False),
    ("discord", "https://evil.example/a.csv", False),
    ("discord", "https://files.slack.com/x", False),
    ("none", "https://cdn.discordapp.com/attachments/1/2/a.csv", True),
    ("none", "https://evil.example/a.csv", False),
    ("none", "http://169.254.169.254/latest/meta-data/", False),
])
def test_only_the_platforms_file_hosts_over_https(make_settings, auth, url, allowed):
    policy = DownloadPolicy(make_settings(slack_api_url="https://slack.com/api/"))
    att = Attachment(name="a.csv", size=1, url=url, auth=auth)
    assert (policy.refusal(att) is None) == allowed
    if not allowed:
        platform = {"slack": "Slack's", "discord": "Discord's", "none": "a chat platform's"}[auth]
        assert policy.refusal(att) == f"`a.csv` does not come from {platform} file servers; it was not fetched."


def test_an_api_url_that_is_not_https_on_a_slack_domain_adds_no_host(make_settings):
    for api in ("http://127.0.0.1:9/api/", "https://slack.com.evil.example/api/", "http://slack.com/api/"):
        policy = DownloadPolicy(make_settings(slack_api_url=api))
        assert policy.hosts["slack"] == frozenset({"files.slack.com"}), api


# --- the token, redirects ----------------------------------------------------------------------------
async def test_the_token_goes_to_a_listed_test_host_and_nowhere_else(make_settings, servers):
    listed, unlisted = await servers(), await servers()
    settings = settings_for(make_settings, listed.test_host)
    assert await fetch(settings, listed.base + "/file") == b"a,b\n1,2\n"
    assert listed.requests == [("/file", f"Bearer {TOKEN}")]
    with pytest.raises(InputRejected, match="does not come from Slack's file servers"):
        await fetch(settings, unlisted.base + "/file")
    assert unlisted.requests == []  # refused before any request
    # Without the test setting, the same loopback server is just another host.
    with pytest.raises(InputRejected, match="does not come from Slack's file servers"):
        await fetch(settings_for(make_settings), listed.base + "/file")
    assert len(listed.requests) == 1


async def test_a_redirect_is_followed_only_within_its_origin(make_settings, servers):
    first, second = await servers(), await servers()
    first.redirect_to = second.base + "/file"
    settings = settings_for(make_settings, first.test_host, second.test_host)  # both trusted, still no hop
    assert await fetch(settings, first.base + "/same") == b"a,b\n1,2\n"
    assert first.requests == [("/same", f"Bearer {TOKEN}"), ("/file", f"Bearer {TOKEN}")]
    with pytest.raises(InputRejected, match="redirected it to another host"):
        await fetch(settings, first.base + "/away")
    assert second.requests == []  # the token never reached the redirect's target
    first.redirect_to = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(InputRejected, match="redirected it to another host"):
        await fetch(settings, first.base + "/away", auth="none")


# --- addresses ------------------------------------------------------------------------------------------
class StaticResolver(AbstractResolver):
    """DNS that answers every name with one address (a poisoned or split-horizon resolver)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        self.asked.append(host)
        return [{"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": 0}]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.10", "100.64.0.1"])
async def test_a_platform_host_that_resolves_to_a_private_address_is_refused(make_settings, address):
    dns = StaticResolver(address)
    with pytest.raises(InputRejected) as refused:
        await fetch(settings_for(make_settings), "https://cdn.discordapp.com/attachments/1/2/a.csv", "discord", dns)
    assert str(refused.value) == "`a.csv` was not fetched: its host does not resolve to a public address."
    assert dns.asked == ["cdn.discordapp.com"]


async def test_localhost_resolves_to_loopback_and_is_refused_unless_listed(make_settings, servers):
    server = await servers()
    guard = _PublicOnlyResolver(DownloadPolicy(settings_for(make_settings)))
    with pytest.raises(DownloadRefused):
        await guard.resolve("localhost", server.port)  # the system's own resolver says 127.0.0.1
    await guard.close()
    # The explicit test setting names host and port; then (only then) it is reachable.
    listed = settings_for(make_settings, f"localhost:{server.port}")
    assert await fetch(listed, f"http://localhost:{server.port}/file", auth="none") == b"a,b\n1,2\n"
    assert server.requests == [("/file", None)]  # auth "none": no token


@pytest.mark.parametrize(("address", "public"), [
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.251", False),
    ("255.255.255.255", False), ("::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("64:ff9b::a00:1", False), ("ff02::1", False), ("nonsense", False),
    ("8.8.8.8", True), ("162.159.128.233", True), ("2606:4700::6810:84e5", True),
])
def test_public_addresses(address, public):
    assert is_public(address) is public


# --- size ---------------------------------------------------------------------------------------------
async def test_a_body_is_cut_at_the_limit_while_it_streams(make_settings, servers):
    server = await servers()
    settings = settings_for(make_settings, server.test_host)
    with pytest.raises(InputRejected, match=r"^a.csv is 1\.\d MB; uploads are limited to 1 MB\.$"):
        await fetch(settings, server.base + "/big")
    with pytest.raises(InputRejected, match=r"^a.csv is 2\.1 MB; uploads are limited to 1 MB\.$"):
        await fetch(settings, server.base + "/declared")  # refused on its Content-Length
