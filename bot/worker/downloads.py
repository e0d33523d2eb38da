"""Fetching a user's upload for the sandbox: from where, with which token, how much.

An Attachment names a URL and the platform whose token it needs (``auth``). A URL is fetched
only when all of these hold:

* **Host.** ``slack``: https to Slack's file server (``files.slack.com``), or to the configured
  Slack API host when that is https on a Slack domain; the bot token goes with it. ``discord``:
  https to Discord's CDN (``cdn.discordapp.com``, ``media.discordapp.net``); no token.
  ``none``: any of those hosts, no token. Port 443 only, no user info in the URL.
* **Address.** Every address the host resolves to is public: never loopback, private,
  link-local, multicast, reserved or otherwise non-global (checked in the connector's resolver,
  so a platform name that resolves to 127.0.0.1 is refused before a connection is made).
* **Redirects** are followed (at most ``MAX_REDIRECTS``) only within the same scheme, host and
  port; a redirect anywhere else ends the download, so the token never leaves that origin.
* **Size.** The body is counted while it streams and cut at ``max_upload_bytes``.

``CODELOOP_DOWNLOAD_TEST_HOSTS`` (tests only, empty by default) names ``host:port`` pairs that
are exempt from the host, scheme and address rules: the fake platform servers on loopback.
Nothing else is: there is no loopback exception.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from bot.core.errors import DownloadRefused, InputRejected
from bot.core.jobs import Attachment
from bot.core.settings import Settings

log = logging.getLogger(__name__)

SLACK_FILE_HOSTS = frozenset({"files.slack.com"})
SLACK_DOMAINS = ("slack.com", "slack-gov.com")
DISCORD_CDN_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PLATFORM = {"slack": "Slack's", "discord": "Discord's", "none": "a chat platform's"}


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped and NAT64 forms unwrapped)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


def _on_slack_domain(host: str) -> bool:
    return any(host == d or host.endswith("." + d) for d in SLACK_DOMAINS)


def _parse_test_hosts(entries: list[str]) -> frozenset[tuple[str, int]]:
    out = set()
    for entry in entries:
        host, _, port = entry.strip().lower().rpartition(":")
        out.add((host.strip("[]"), int(port)))
    return frozenset(out)


class DownloadPolicy:
    """Which URLs may be fetched for which ``auth``, and which addresses they may reach."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        slack = set(SLACK_FILE_HOSTS)
        api = URL(settings.slack_api_url)
        if api.scheme == "https" and api.host and _on_slack_domain(api.host.lower()) and api.port == 443:
            slack.add(api.host.lower())
        self.hosts: dict[str, frozenset[str]] = {
            "slack": frozenset(slack), "discord": DISCORD_CDN_HOSTS, "none": frozenset(slack) | DISCORD_CDN_HOSTS}
        self.test_hosts = _parse_test_hosts(settings.download_test_hosts)

    def is_test_host(self, host: str | None, port: int | None) -> bool:
        return host is not None and port is not None and (host.lower().strip("[]"), port) in self.test_hosts

    def allows(self, auth: str, url: URL) -> bool:
        if self.is_test_host(url.host, url.port):
            return url.scheme in ("http", "https") and not url.user and not url.password
        return (url.scheme == "https" and url.port == 443 and not url.user and not url.password
                and (url.host or "").lower() in self.hosts.get(auth, frozenset()))

    def refusal(self, att: Attachment) -> str | None:
        """Why the attachment's URL may not be fetched (a message for the user), or None."""
        if att.url is None:
            return None
        try:
            url = URL(att.url)
        except ValueError:
            url = URL()
        if self.allows(att.auth, url):
            return None
        return f"`{att.name}` does not come from {_PLATFORM[att.auth]} file servers; it was not fetched."

    def headers(self, att: Attachment) -> dict[str, str]:
        if att.auth == "slack" and self.settings.slack_bot_token is not None:
            return {"Authorization": f"Bearer {self.settings.slack_bot_token.get_secret_value()}"}
        return {}


class _PublicOnlyResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then refuses a host any of whose addresses is
    not public (one private answer among public ones is enough: the connector may pick it)."""

    def __init__(self, policy: DownloadPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        if self.policy.is_test_host(host, port):
            return answers
        if not answers or not all(is_public(a["host"]) for a in answers):
            log.warning("download refused: %s resolves to %s", host, [a["host"] for a in answers])
            raise DownloadRefused(f"{host} resolves to a non-public address")
        return answers

    async def close(self) -> None:
        await self.inner.close()


class Downloader:
    """One per job's uploads: its own connector, whose resolver enforces the address rule."""

    def __init__(self, settings: Settings, resolver: AbstractResolver | None = None) -> None:
        self.settings = settings
        self.policy = DownloadPolicy(settings)
        self._resolver = _PublicOnlyResolver(self.policy, resolver)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Downloader:
        connector = aiohttp.TCPConnector(resolver=self._resolver, use_dns_cache=False)
        self._http = aiohttp.ClientSession(connector=connector, trust_env=False,
                                           timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def fetch(self, att: Attachment) -> bytes:
        """The attachment's bytes; InputRejected (with a message for the user) for anything else."""
        assert self._http is not None, "use Downloader as an async context manager"
        problem = self.policy.refusal(att) if att.url else f"{att.name}: the upload has neither data nor a URL"
        if problem:
            raise InputRejected(problem)
        url, headers = URL(att.url or ""), self.policy.headers(att)
        if self.policy.is_test_host(url.host, url.port):
            log.warning("downloading %s from a test host (CODELOOP_DOWNLOAD_TEST_HOSTS is set)", att.name)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with self._http.get(url, headers=headers, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        url = self._next_hop(att, url, resp)
                        continue
                    return await self._body(att, resp)
            except DownloadRefused:
                raise InputRejected(f"`{att.name}` was not fetched: its host does not resolve to a "
                                    "public address.") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("download of %s failed: %s", att.name, exc)
                raise InputRejected(f"`{att.name}` could not be downloaded; please attach it again.") from None
        raise InputRejected(f"`{att.name}` was not fetched: the file server redirected too many times.")

    @staticmethod
    def _next_hop(att: Attachment, url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location", "")
        target = url.join(URL(location)) if location else url
        if not location or (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
            raise InputRejected(f"`{att.name}` was not fetched: the file server redirected it to another host.")
        return target

    async def _body(self, att: Attachment, resp: aiohttp.ClientResponse) -> bytes:
        if resp.status != 200:
            raise InputRejected(f"{att.name}: could not download the upload (HTTP {resp.status})")
        if resp.content_type == "text/html" and "html" not in att.mime:
            # Slack answers a bad token with its login page and status 200; that is not the user's file.
            raise InputRejected(f"{att.name}: the platform returned a web page instead of the file "
                                "(is the bot token allowed to read files? scope files:read)")
        limit = self.settings.max_upload_bytes
        declared = resp.content_length
        if declared is not None and declared > limit:
            raise InputRejected(too_big(att.name, declared, limit))
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            total += len(chunk)
            if total > limit:
                raise InputRejected(too_big(att.name, total, limit))
            chunks.append(chunk)
        return b"".join(chunks)


def too_big(name: str, size: int, limit: int) -> str:
    return f"{name} is {size / 1e6:.1f} MB; uploads are limited to {limit / 1e6:.0f} MB."

