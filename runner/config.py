"""Sandbox configuration and the hardening defaults, in one place (documented in docs/SANDBOX.md).

``SandboxConfig`` is plain data so the runner library never parses the environment itself;
``SandboxConfig.from_settings`` maps the worker's ``Settings`` onto it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from docker.types import LogConfig, Ulimit

from runner.hardening import security_opt

if TYPE_CHECKING:
    from bot.core.settings import Settings

#: image label checked at start: an image built from an older executor is refused, not half-used
PROTOCOL = "3"
SUPERVISOR = ["python", "-u", "/opt/codeloop/supervisor.py"]
DATA_DIR = "/mnt/data"
#: where the operator's wheelhouse appears in a sandbox (deploy/docker_proxy_policy.py WHEELHOUSE_TARGET)
WHEELHOUSE_DIR = "/opt/wheelhouse"
SESSION_LABEL = "codeloop.session"
NAME_LABEL = "codeloop.label"
POOL_LABEL = "pool"  # label of a warm container no thread has taken yet
#: ``user`` value for a fresh uid:gid per container, drawn from UID_RANGE (the default)
AUTO_USER = "auto"
#: per-session uids: above every uid a distribution or the service image (10001) hands out, below
#: 2^31 - 1 (what the docker proxy accepts); kernel per-uid limits are then not shared by sessions
UID_RANGE = (1 << 20, (1 << 31) - 1)
#: the kernel's budget for one cell's rich results (runner/sandbox/kernel.py RESULTS_BYTES)
RESULTS_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class SandboxConfig:
    image: str = "codeloop-sandbox:latest"
    runtime: str | None = None  # e.g. "runsc" (gVisor)
    memory: str = "1g"
    cpus: float = 1.0
    pids: int = 128
    cell_timeout_s: float = 30.0
    tmp_size: str = "64m"
    data_size: str = "256m"
    #: host directory of wheels that %pip / !pip install from, mounted read-only (None: none)
    wheelhouse: str | None = None
    nofile: int = 256
    fsize: int = 256 * 1024 * 1024
    #: "auto": a fresh random uid:gid per container (UID_RANGE); "uid:gid" pins one for all
    user: str = AUTO_USER
    idle_ttl_s: float = 1800.0
    pool_size: int = 2
    #: a warm container no thread has taken exits after this long without its worker's ping
    pool_claim_ttl_s: float = 60.0
    output_chars: int = 20_000
    max_files: int = 20
    max_file_bytes: int = 10 * 1024 * 1024
    #: all files of one cell together; bounds the largest legitimate reply the host accepts
    max_total_file_bytes: int = 32 * 1024 * 1024
    #: the largest upload; bounds a request line the supervisor accepts (base64 inside JSON)
    max_upload_bytes: int = 25 * 1024 * 1024
    #: after an interrupt, how long the cell may take to stop before the kernel is killed
    interrupt_grace_s: float = 1.0
    #: container create + start + executor ready
    start_timeout_s: float = 30.0
    #: extra labels on every sandbox (e.g. the deployment), on top of the codeloop.* ones
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SandboxConfig:
        values: dict[str, Any] = {
            name: getattr(settings, f"sandbox_{name}")
            for name in (
                "image",
                "runtime",
                "memory",
                "cpus",
                "pids",
                "cell_timeout_s",
                "tmp_size",
                "data_size",
                "wheelhouse",
                "nofile",
                "fsize",
                "user",
                "idle_ttl_s",
                "pool_size",
                "pool_claim_ttl_s",
                "output_chars",
                "max_files",
                "max_file_bytes",
                "max_total_file_bytes",
            )
        }
        values["max_upload_bytes"] = settings.max_upload_bytes
        values["labels"] = dict(item.split("=", 1) for item in settings.sandbox_labels)
        values["labels"].update(overrides.pop("labels", {}))
        values.update(overrides)
        return cls(**values)

    def draw_user(self) -> tuple[str, str]:
        """(uid, gid) for one new container: random per container unless ``user`` pins them."""
        if self.user == AUTO_USER:
            uid = str(UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]))
            return uid, uid
        uid, _, gid = self.user.partition(":")
        return uid, gid or uid

    @property
    def max_request_bytes(self) -> int:
        """The longest request line the supervisor reads: an upload, base64-encoded, plus room."""
        return self.max_upload_bytes * 4 // 3 + (1 << 20)

    @property
    def max_reply_bytes(self) -> int:
        """The longest line a well-behaved supervisor sends (a run reply): every file base64-encoded
        (names JSON-escaped), the kernel's answer as the supervisor accepts it (rich results,
        error) re-escaped, inline stdout/stderr JSON-escaped, notes. A longer line is a violation."""
        files = self.max_total_file_bytes * 4 // 3 + (self.max_files + 2) * (6 * 4096 + 128)
        kernel_answer = RESULTS_BYTES + 48 * self.output_chars + (1 << 20)
        inline = 2 * 12 * (self.output_chars + 200)
        return files + kernel_answer * 7 // 6 + inline + (1 << 20)

    def command(self, claim_ttl_s: float = 0.0) -> list[str]:
        return [
            *SUPERVISOR,
            "--idle-ttl",
            f"{self.idle_ttl_s:g}",
            "--claim-ttl",
            f"{claim_ttl_s:g}",
            "--timeout",
            f"{self.cell_timeout_s:g}",
            "--grace",
            f"{self.interrupt_grace_s:g}",
            "--output-chars",
            str(self.output_chars),
            "--max-files",
            str(self.max_files),
            "--max-file-bytes",
            str(self.max_file_bytes),
            "--max-total-file-bytes",
            str(self.max_total_file_bytes),
            "--max-request-bytes",
            str(self.max_request_bytes),
        ]


def _tmpfs(size: str, uid: str, gid: str, mode: str) -> str:
    # noexec is left off /mnt/data and /tmp on purpose: pip-installed wheels and user scripts run
    # from there, and the real boundaries are the user, the dropped capabilities and the runtime.
    return f"rw,nosuid,nodev,size={size},uid={uid},gid={gid},mode={mode}"


def host_config(api: Any, config: SandboxConfig, user: tuple[str, str]) -> dict[str, Any]:
    """The hardened HostConfig of a sandbox container running as ``user`` (uid, gid)."""
    uid, gid = user
    opts: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {
            "/tmp": _tmpfs(config.tmp_size, uid, gid, "1777"),
            DATA_DIR: _tmpfs(config.data_size, uid, gid, "0755"),
        },
        "cap_drop": ["ALL"],
        "security_opt": security_opt(),  # no-new-privileges + the shipped seccomp profile
        "pids_limit": config.pids,
        "mem_limit": config.memory,
        "memswap_limit": config.memory,  # equal to the memory limit: no swap
        "nano_cpus": int(config.cpus * 1e9),
        "ulimits": [
            Ulimit(name="nofile", soft=config.nofile, hard=config.nofile),
            Ulimit(name="fsize", soft=config.fsize, hard=config.fsize),
        ],
        # The supervisor is PID 1 itself: it reaps orphans, signals from inside cannot kill or stop
        # it, and no other process (docker-init) holds the attach stream.
        "init": False,
        "auto_remove": True,  # the executor exits after the idle TTL; the engine then cleans up
        "log_config": LogConfig(type="none"),  # protocol traffic (uploads, files) never hits disk
        "ipc_mode": "private",
    }
    if config.runtime:
        opts["runtime"] = config.runtime
    if config.wheelhouse:  # the only bind mount a sandbox gets (and the docker proxy allows)
        opts["binds"] = [f"{config.wheelhouse}:{WHEELHOUSE_DIR}:ro"]
    result: dict[str, Any] = api.create_host_config(**opts)
    return result


def container_spec(api: Any, config: SandboxConfig, label: str, claim_ttl_s: float = 0.0) -> dict[str, Any]:
    """The engine's container config for one sandbox (for ``APIClient.create_container_from_config``);
    ``claim_ttl_s`` > 0 for a warm-pool container (see the supervisor's ``--claim-ttl``). Each call
    draws the container's own uid:gid (``SandboxConfig.draw_user``); its tmpfs mounts follow it."""
    user = config.draw_user()
    spec: dict[str, Any] = api.create_container_config(
        **{
            "image": config.image,
            "command": config.command(claim_ttl_s),
            "user": ":".join(user),
            # Explicit and minimal: nothing of the worker's environment (tokens, URLs) is passed on.
            "environment": {
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/tmp",
                "LANG": "C.UTF-8",
                # pip never reaches an index (PIP_NO_INDEX in the image); wheels come from here
                **({"PIP_FIND_LINKS": WHEELHOUSE_DIR} if config.wheelhouse else {}),
            },
            "working_dir": DATA_DIR,
            "hostname": "sandbox",
            "stdin_open": True,
            "tty": False,
            "network_disabled": True,
            "labels": {**config.labels, SESSION_LABEL: "1", NAME_LABEL: label[:200]},
            "host_config": host_config(api, config, user),
        }
    )
    # The SDK sets StdinOnce with stdin_open, which closes stdin (and so ends the executor) when
    # the first worker detaches; sessions must outlive a worker. Building the config directly also
    # skips the SDK's injection of the client's proxy settings into the environment.
    spec["StdinOnce"] = False
    return spec


def slug(label: str) -> str:
    """A container-name-safe form of a label (container names allow [a-zA-Z0-9_.-])."""
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", label).strip("-.")[:40] or "session"
