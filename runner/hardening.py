"""The kernel-facing hardening of every sandbox: no-new-privileges and codeloop's seccomp profile.

``seccomp.json`` (next to this module) is the Docker engine's default profile (Debian's
docker.io 20.10.24, from its golang-github-docker-docker-dev package) with three changes:

- ``socket`` is allowed for every address family but AF_VSOCK (40), which reaches the
  hypervisor's host side on a VM;
- on x86_64 the filter covers the native ABI only (Docker's adds i386 and x32): on i386,
  libseccomp turns a ``socket`` rule with an argument check into an unconditional
  ``socketcall(SYS_SOCKET)``, so an ``int 0x80`` from a cell would go around the AF_VSOCK rule.
  A 32-bit syscall now kills the calling process (SIGSYS); ``socketcall`` is off the list too;
- ``io_uring_setup``, ``io_uring_enter`` and ``io_uring_register`` are not allowed (io_uring's
  kernel side has been a steady source of privilege escalations, and a ring's operations are not
  seen by seccomp at all).

Everything the profile does not allow fails with EPERM. The docker proxy (deploy/docker_proxy.py)
admits only containers created with exactly :func:`security_opt`, so a worker cannot swap in a
weaker profile; it reads the same file (copied into the service image).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

PROFILE_PATH = Path(__file__).with_name("seccomp.json")


@functools.cache
def seccomp_profile() -> dict[str, Any]:
    """The shipped profile, parsed once."""
    profile: dict[str, Any] = json.loads(PROFILE_PATH.read_text(encoding="utf-8"))
    return profile


@functools.cache
def _seccomp_json() -> str:
    return json.dumps(seccomp_profile(), separators=(",", ":"))


def security_opt() -> list[str]:
    """HostConfig.SecurityOpt of every sandbox: the engine takes an inline profile after ``seccomp=``."""
    return ["no-new-privileges", f"seccomp={_seccomp_json()}"]
