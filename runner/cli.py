"""``codeloop sandbox``: build the sandbox image, list, reap or clean sandbox containers.

``ls``, ``reap`` and ``clean`` act on every engine the workers use: each one listed in
``CODELOOP_SANDBOX_ENGINES`` (the ENGINE column names it), else the default engine (``DOCKER_HOST``).
An engine that does not answer is named and skipped; the command then exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, NotFound

from bot.core.errors import SandboxUnavailable
from runner.config import NAME_LABEL, SESSION_LABEL

HERE = Path(__file__).resolve().parent
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
CONTEXT_FILES = (
    "Dockerfile",
    "sandbox/supervisor.py",
    "sandbox/kernel.py",
    "sandbox/files.py",
    "sandbox/procs.py",
    "sandbox/wire.py",
    "sandbox/link.py",
    "image/requirements.txt",
    "image/constraints.txt",
    "image/extra-requirements.txt",
)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build the sandbox image (streams the build output)")
    build.add_argument("--base", help="base image with Python 3.10+ (default: python:3.12-slim)")
    build.add_argument("--tag", help="image tag (default: CODELOOP_SANDBOX_IMAGE)")
    build.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    build.add_argument("--packages", default="",
                       help='extra pip requirements, space-separated (e.g. "polars duckdb"), on top of the batteries')
    build.add_argument("--requirements", type=Path, help="a requirements file of extra packages to install too")
    sub.add_parser("ls", help="list sandbox containers")
    sub.add_parser("reap", help="one janitor pass: remove sandboxes idle past the TTL, frozen or not running "
                   "(the ones a worker's janitor would; CODELOOP_SANDBOX_LABELS selects the deployment)")
    clean = sub.add_parser("clean", help="remove sandbox containers (live sessions lose their state) and the "
                           "threads' stored files (CODELOOP_FILES_DIR)")
    clean.add_argument("--label", help="only sandboxes with this codeloop.label (e.g. pool); keeps stored files")


@dataclass
class _Engines:
    """Clients for the engines the workers use, and the names of those that did not answer."""

    clients: list[tuple[str, docker.DockerClient]]
    unreachable: list[str]

    def report(self) -> int:
        for line in self.unreachable:
            print(f"skipped {line}", file=sys.stderr)
        return 1 if self.unreachable else 0


def _engines() -> _Engines:
    from bot.core.settings import Settings
    from runner.engine_list import parse_engines

    settings = Settings.load()
    if not settings.sandbox_engines:
        return _Engines([("default", _client())], [])
    specs = parse_engines(settings.sandbox_engines, settings.sandbox_engine_sessions,
                          settings.sandbox_engine_memory, settings.sandbox_engine_tls_dir)
    found = _Engines([], [])
    for spec in specs:
        try:
            client = spec.client(settings.sandbox_engine_timeout_s)
            client.ping()
        except (DockerException, OSError) as exc:
            found.unreachable.append(f"engine {spec.name} ({spec.url}): unreachable ({exc})")
            continue
        found.clients.append((spec.name, client))
    if not found.clients:
        raise SandboxUnavailable("no sandbox engine answered: " + "; ".join(found.unreachable))
    return found


def _client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except (DockerException, OSError) as exc:
        hint = "start dockerd or set DOCKER_HOST"
        raise SandboxUnavailable(f"Docker engine unreachable ({exc}); {hint}") from exc
    return client


def _default_tag() -> str:
    from bot.core.settings import Settings

    return Settings.load().sandbox_image


def _context(into: Path, requirements: Path | None = None) -> bool:
    """Copy the build context into ``into`` (``requirements``, the operator's extras, replaces
    image/extra-requirements.txt); True when this host's CA bundle went along."""
    for name in CONTEXT_FILES:
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / name, target)
    if requirements is not None:
        shutil.copy(requirements, into / "image" / "extra-requirements.txt")
    (into / "certs").mkdir()
    # pip inside the build must trust what this host trusts (TLS-intercepting proxies, private CAs).
    for bundle in CA_BUNDLES:
        if Path(bundle).is_file():
            shutil.copy(bundle, into / "certs" / "host-ca.crt")
            return True
    return False


def build_args(args: argparse.Namespace) -> dict[str, str]:
    """The Dockerfile's build arguments: the base image and the operator's extra packages."""
    buildargs = {"BASE": args.base} if args.base else {}
    if args.packages.strip():
        buildargs["PACKAGES"] = " ".join(args.packages.split())
    return buildargs


def build(args: argparse.Namespace) -> int:
    client = _client()
    tag = args.tag or _default_tag()
    buildargs = build_args(args)
    if args.requirements is not None and not args.requirements.is_file():
        print(f"build failed: no requirements file {args.requirements}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="codeloop-sandbox-") as tmp:
        with_ca = _context(Path(tmp), args.requirements)
        print(f"building {tag} from {args.base or 'python:3.12-slim'}"
              + (" (with this host's CA bundle for pip)" if with_ca else ""), flush=True)
        stream = client.api.build(path=tmp, tag=tag, buildargs=buildargs, decode=True, rm=True,
                                  forcerm=True, nocache=args.no_cache, pull=False)
        for chunk in stream:
            if "error" in chunk:
                print(f"build failed: {chunk['error'].strip()}", file=sys.stderr)
                return 1
            text = chunk.get("stream") or chunk.get("status")
            if text:
                sys.stdout.write(text if text.endswith("\n") else text + "\n")
                sys.stdout.flush()
    print(f"built {tag}")
    return 0


def _sandboxes(client: docker.DockerClient, label: str | None) -> list[Any]:
    filters = [f"{SESSION_LABEL}=1"] + ([f"{NAME_LABEL}={label}"] if label else [])
    found: list[Any] = client.containers.list(all=True, filters={"label": filters})
    return found


def ls(args: argparse.Namespace) -> int:
    engines = _engines()
    rows = [("ENGINE", "ID", "NAME", "LABEL", "STATUS", "CREATED")]
    for engine, client in engines.clients:
        for c in _sandboxes(client, None):
            created = str(c.attrs.get("Created", ""))[:19].replace("T", " ")
            rows.append((engine, c.short_id, c.name, c.labels.get(NAME_LABEL, ""), c.status, created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return engines.report()


def clean(args: argparse.Namespace) -> int:
    engines = _engines()
    removed = 0
    for _, client in engines.clients:
        for c in _sandboxes(client, args.label):
            try:
                c.remove(force=True)
                removed += 1
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: already being auto-removed
                    raise
    print(f"removed {removed} sandbox container(s)")
    if args.label is None:
        from bot.core.settings import Settings
        from bot.worker.files_store import FilesStore

        threads = FilesStore.from_settings(Settings.load()).clear()
        print(f"removed the stored files of {threads} thread(s)")
    return engines.report()


def reap(args: argparse.Namespace) -> int:
    from bot.core.settings import Settings
    from runner.config import SandboxConfig
    from runner.janitor import ReapPolicy, reap_once
    from runner.manager import SandboxManager

    settings = Settings.load()
    engines = _engines()
    config = SandboxConfig.from_settings(settings, pool_size=0)
    policy = ReapPolicy.from_settings(settings)

    async def one_pass(client: docker.DockerClient) -> list[tuple[str, str]]:
        return await reap_once(SandboxManager(config, client, reap=policy))  # no start(): no pool, no janitor

    total = 0
    for engine, client in engines.clients:
        removed = asyncio.run(one_pass(client))
        for cid, reason in removed:
            print(f"removed {cid[:12]}" + (f" on {engine}" if len(engines.clients) > 1 else "") + f": {reason}")
        total += len(removed)
    print(f"removed {total} sandbox container(s)")
    return engines.report()


def main(args: argparse.Namespace) -> int:
    actions = {"build": build, "ls": ls, "reap": reap, "clean": clean}
    return actions[args.action](args)
