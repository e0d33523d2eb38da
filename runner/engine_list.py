"""The ``CODELOOP_SANDBOX_ENGINES`` list: each entry a named Docker endpoint with its limits and TLS.

``name=unix:///path`` or ``name=tcp://host:port``, optionally followed by ``?sessions=N&memory=SIZE``;
names are stored in threads (``<name>/<container id>``), so they are short, lowercase and stable.
A ``tcp://`` engine off this host needs TLS material (``ca.pem``, ``cert.pem``, ``key.pem``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import docker
from docker.errors import DockerException
from docker.tls import TLSConfig
from docker.utils import parse_bytes

from bot.core.errors import ConfigError

#: the API version spoken to listed engines: fixed, so a worker starts without asking an engine that
#: is down (docker's "auto" asks at construction); Docker 20.10 speaks it, and later engines still do
API_VERSION = "1.41"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


@dataclass(frozen=True)
class EngineSpec:
    name: str
    url: str  # unix:///path or tcp://host:port
    max_sessions: int
    max_memory: int | None  # bytes of sandbox memory limits; None: sessions only
    tls_dir: str | None = None

    def client(self, timeout_s: float) -> docker.DockerClient:
        """A docker client for this engine; every call (and the attach connect) bounded by ``timeout_s``."""
        if self.url.startswith("unix://"):
            return docker.DockerClient(base_url=self.url, version=API_VERSION, timeout=timeout_s)
        tls = None
        if self.tls_dir:
            files = [os.path.join(self.tls_dir, f) for f in ("ca.pem", "cert.pem", "key.pem")]
            tls = TLSConfig(client_cert=(files[1], files[2]), ca_cert=files[0], verify=True)
        return docker.DockerClient(base_url=self.url, version=API_VERSION, tls=tls,
                                   timeout=timeout_s)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_engines(entries: list[str], sessions: int, memory: str | None, tls_dir: str | None) -> list[EngineSpec]:
    """``CODELOOP_SANDBOX_ENGINES`` entries; a bad one raises ConfigError saying what is wrong."""
    specs: list[EngineSpec] = []
    for entry in entries:
        name, eq, rest = entry.partition("=")
        name = name.strip()
        where = f"CODELOOP_SANDBOX_ENGINES entry {entry!r}"
        if not eq or not _NAME.match(name):
            raise ConfigError(f"{where}: want name=unix:///path or name=tcp://host:port "
                              "(name: lowercase letters, digits and -, stable: threads store it)")
        if any(s.name == name for s in specs):
            raise ConfigError(f"{where}: the name {name} is listed twice")
        url = urlsplit(rest.strip())
        try:
            query = {k: v[-1] for k, v in parse_qs(url.query, strict_parsing=bool(url.query)).items()}
            limit_sessions = int(query.pop("sessions", sessions))
            limit_memory = query.pop("memory", memory)
            limit_bytes = parse_bytes(limit_memory) if limit_memory else None
        except (ValueError, DockerException) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if query or limit_sessions < 1:
            raise ConfigError(f"{where}: only ?sessions=N (N >= 1) and &memory=SIZE may follow the address")
        engine_tls = None
        if url.scheme == "unix" and url.path and not url.netloc:
            address = f"unix://{url.path}"
        elif url.scheme == "tcp" and url.hostname and url.port and not url.path.strip("/"):
            address = f"tcp://{url.netloc}"
            if tls_dir:
                own = os.path.join(tls_dir, name)
                engine_tls = own if os.path.isdir(own) else tls_dir
            elif not _loopback(url.hostname):
                # the proxy admits sandboxes only; still, never send its traffic in clear off the host
                raise ConfigError(f"{where}: a tcp:// engine off this host needs TLS "
                                  "(set CODELOOP_SANDBOX_ENGINE_TLS_DIR)")
        else:
            raise ConfigError(f"{where}: the address must be unix:///path or tcp://host:port")
        specs.append(EngineSpec(name, address, limit_sessions, limit_bytes, engine_tls))
    return specs
