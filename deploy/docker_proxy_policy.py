"""What a sandbox container may be: the create-body policy of codeloop-docker-proxy.

dockerd decodes JSON with Go's encoding/json: field names match case-insensitively and the last
of two matches wins, so a check of ``cfg["User"]`` proves nothing while ``"user": "0"`` rides
along. Here the body is parsed with every key kept (duplicates included), each key is mapped onto
an allowlist case-insensitively, unknown and repeated fields are refused, each value is checked,
and a new body is built in Docker's own casing from the checked values alone. The proxy forwards
that body, never the client's bytes. Stdlib only, like the proxy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INT32_MAX = 2**31 - 1
#: where a sandbox sees the operator's wheelhouse (runner/config.py WHEELHOUSE_DIR), read-only
WHEELHOUSE_TARGET = "/opt/wheelhouse"
DROP: Any = object()  # a checked value that is left out of the forwarded body
Check = Callable[[Any, str], Any]

_USER = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
_SIGNAL = re.compile(r"[A-Z0-9+]{1,16}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_PATH = re.compile(r"(/[A-Za-z0-9._@+-]+)+")
_SIZE = re.compile(r"([0-9]{1,15})([kmg]?)", re.IGNORECASE)
_MODE = re.compile(r"[0-7]{3,4}")
_TMPFS_FLAGS = {"rw", "ro", "nosuid", "nodev", "noexec", "exec"}
_ULIMITS = {"nofile", "fsize", "core", "stack", "nproc", "cpu", "data"}


class Denied(Exception):
    """A request the policy refuses; the message goes to the client (HTTP 403 unless ``status``)."""

    status = 403


class Pairs(list[tuple[str, Any]]):
    """A JSON object as parsed: every key in order, duplicates kept."""


def parse_json(body: bytes) -> Any:
    """The body as JSON with objects as :class:`Pairs`; strict UTF-8, no NaN/Infinity."""

    def constant(name: str) -> Any:
        raise Denied(f"body: {name} is not a JSON value")

    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=Pairs, parse_constant=constant)
    except RecursionError:
        raise Denied("body: nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise Denied(f"body is not valid JSON ({exc})") from None


def fold(key: str) -> str:
    """Go's case-insensitive field match, a little looser: anything it matches, this matches."""
    return key.casefold()


# --- value checks ---------------------------------------------------------------------------------
def obj(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    """An object with exactly these fields (any casing, each at most once)."""
    by_fold = {fold(name): name for name in fields}

    def check(value: Any, where: str) -> Any:
        if value is None and not required:
            return DROP
        if not isinstance(value, Pairs):
            raise Denied(f"{where or 'the body'} must be an object")
        out: dict[str, Any] = {}
        seen: dict[str, str] = {}
        for key, item in value:
            name = by_fold.get(fold(key))
            if name is None:
                raise Denied(f"{where or 'the body'}: field {key!r} is not allowed for a sandbox")
            if name in seen:
                raise Denied(f"{where or 'the body'}: field {name} given twice (as {seen[name]!r} and {key!r})")
            seen[name] = key
            checked = fields[name](item, f"{where}.{name}" if where else name)
            if checked is not DROP:
                out[name] = checked
        for name in required:
            if name not in out:
                raise Denied(f"{where + '.' if where else ''}{name} is required")
        return out

    return check


def empty(value: Any, where: str) -> Any:
    """Allowed only as nothing (null, false, 0, "", [], {}); never forwarded."""
    if value is None or (type(value) in (bool, int, str, list, Pairs) and not value):
        return DROP
    raise Denied(f"{where} must be empty (got {_short(value)})")


def empty_or_none(value: Any) -> bool:
    """What :func:`empty` accepts."""
    return value is None or (type(value) in (bool, int, str, list, Pairs) and not value)


def null(value: Any, where: str) -> Any:
    if value is None:
        return DROP
    raise Denied(f"{where} must be null (got {_short(value)})")


def false(value: Any, where: str) -> Any:
    if value is None or value is False:
        return DROP
    raise Denied(f"{where} must be false (got {_short(value)})")


def boolean(value: Any, where: str) -> Any:
    if value is None:
        return DROP
    if not isinstance(value, bool):
        raise Denied(f"{where} must be true or false")
    return value


def const(expected: Any) -> Check:
    def check(value: Any, where: str) -> Any:
        if type(value) is not type(expected) or value != expected:
            raise Denied(f"{where} must be {json.dumps(expected)} (got {_short(value)})")
        return expected

    return check


def one_of(allowed: tuple[str, ...], or_empty: bool = False) -> Check:
    def check(value: Any, where: str) -> Any:
        if value is None or (or_empty and value == ""):
            return DROP
        if not isinstance(value, str) or value not in allowed:
            raise Denied(f"{where} may not be {_short(value)} (allowed: {', '.join(allowed)})")
        return value

    return check


def integer(lo: int, hi: int, optional: bool = True) -> Check:
    def check(value: Any, where: str) -> Any:
        if value is None and optional:
            return DROP
        if type(value) is not int or not lo <= value <= hi:
            raise Denied(f"{where} must be a whole number in [{lo}, {hi}] (got {_short(value)})")
        return value

    return check


def text(limit: int = 4096, pattern: re.Pattern[str] | None = None) -> Check:
    """A string, kept as it is (list items, map keys and values)."""

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or len(value) > limit or "\0" in value:
            raise Denied(f"{where} must be a string of at most {limit} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise Denied(f"{where} may not be {_short(value)}")
        return value

    return check


def string(pattern: re.Pattern[str] | None = None, limit: int = 4096) -> Check:
    """An optional string field: null and "" are left out."""
    check = text(limit, pattern)
    return lambda value, where: DROP if value is None or value == "" else check(value, where)


def strings(max_items: int = 256, limit: int = 32768) -> Check:
    return list_of(text(limit), max_items)


def list_of(each: Check, max_items: int) -> Check:
    def check(value: Any, where: str) -> Any:
        if value is None or value == []:
            return DROP
        if type(value) is not list or len(value) > max_items:
            raise Denied(f"{where} must be a list of at most {max_items} items")
        return [each(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return check


def string_map(max_items: int, key: Check, val: Check) -> Check:
    """A JSON object used as a map: keys are data (matched exactly), each at most once."""

    def check(value: Any, where: str) -> Any:
        if value is None:
            return DROP
        if not isinstance(value, Pairs) or len(value) > max_items:
            raise Denied(f"{where} must be an object of at most {max_items} entries")
        out: dict[str, Any] = {}
        for k, v in value:
            if k in out:
                raise Denied(f"{where}: {k!r} given twice")
            out[key(k, where)] = val(v, f"{where}[{k!r}]")
        return out

    return check


def _short(value: Any) -> str:
    shown = json.dumps(value, default=str)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def size_bytes(size: str) -> int:
    """``64m`` style sizes (the tmpfs ``size=`` option, the proxy's own limits), k = 1024."""
    m = _SIZE.fullmatch(size)
    if not m:
        raise ValueError(f"not a size: {size!r}")
    return int(m[1]) * int(1024 ** " kmg".index((m[2] or " ").lower()))


# --- the policy -----------------------------------------------------------------------------------
@dataclass
class CreatePolicy:
    """Limits of a sandbox container; :meth:`check` turns a create body into the body forwarded."""

    seccomp_profile: dict[str, Any]
    runtimes: list[str] = field(default_factory=lambda: ["runc", "runsc"])
    label: str = "codeloop.session"
    min_uid: int = 10000
    max_memory: int = 4 * 1024**3
    max_pids: int = 512
    max_cpus: float = 4.0
    #: the host directory of pip wheels sandboxes may mount read-only at WHEELHOUSE_TARGET (the
    #: only bind mount a sandbox may have; None: none at all)
    wheelhouse: str | None = None

    def __post_init__(self) -> None:
        if self.wheelhouse is not None and (
            not _PATH.fullmatch(self.wheelhouse) or {".", ".."} & set(self.wheelhouse.split("/"))
        ):
            raise ValueError(f"the wheelhouse must be a plain absolute path, not {self.wheelhouse!r}")
        profile = json.dumps(self.seccomp_profile, separators=(",", ":"))
        self.security_opt = ["no-new-privileges", f"seccomp={profile}"]
        memory = integer(1, self.max_memory, optional=False)
        tmpfs_mount = obj(
            {
                "Target": self._mount_target, "Type": const("tmpfs"), "ReadOnly": boolean,
                "Source": empty, "Consistency": empty,
                "TmpfsOptions": obj({"SizeBytes": integer(1, self.max_memory, optional=False),
                                     "Mode": integer(0, 0o7777)}, required=("SizeBytes",)),
            },
            required=("Target", "Type", "TmpfsOptions"),
        )
        ulimit = obj({"Name": one_of(tuple(sorted(_ULIMITS))), "Soft": integer(0, 2**62, optional=False),
                      "Hard": integer(0, 2**62, optional=False)}, required=("Name", "Soft", "Hard"))
        host = obj(
            {
                "NetworkMode": const("none"), "ReadonlyRootfs": const(True), "Privileged": false,
                "CapDrop": self._cap_drop, "CapAdd": empty, "SecurityOpt": self._security_opt,
                "Memory": memory, "MemorySwap": memory,
                "NanoCpus": integer(1, int(self.max_cpus * 1e9), optional=False),
                "PidsLimit": integer(1, self.max_pids, optional=False),
                "ShmSize": integer(1, self.max_memory), "OomScoreAdj": integer(0, 1000),
                "Ulimits": list_of(self._ulimit(ulimit), 16),
                "Tmpfs": string_map(8, self._mount_target, self._tmpfs_options),
                "Mounts": list_of(self._only_tmpfs(tmpfs_mount), 8),
                "LogConfig": self._log_config, "Init": boolean, "AutoRemove": boolean,
                "IpcMode": one_of(("private", "none"), or_empty=True),
                "Runtime": one_of(tuple(self.runtimes), or_empty=True),
                # [] is not "the default" here but "mask nothing": only null passes
                "MaskedPaths": null, "ReadonlyPaths": null,
                # a sandbox that restarts itself would outlive its idle TTL
                "RestartPolicy": obj({"Name": one_of(("no",), or_empty=True), "MaximumRetryCount": empty}),
                # named so that the refusal says which one; only "nothing" passes, and is dropped
                "Binds": self._binds,
                **dict.fromkeys(
                    ("GroupAdd", "Devices", "DeviceRequests", "DeviceCgroupRules", "VolumesFrom",
                     "VolumeDriver", "Links", "PortBindings", "PublishAllPorts", "Sysctls", "ExtraHosts",
                     "PidMode", "UTSMode", "UsernsMode", "CgroupnsMode", "Cgroup", "CgroupParent",
                     "OomKillDisable", "StorageOpt", "Dns", "DnsOptions",
                     "DnsSearch", "ContainerIDFile", "Isolation"),
                    empty,
                ),
            },
            required=("NetworkMode", "ReadonlyRootfs", "CapDrop", "SecurityOpt", "Memory", "MemorySwap",
                      "NanoCpus", "PidsLimit", "LogConfig"),
        )
        self._body = obj(
            {
                "Image": string(_IMAGE), "User": self._user, "Labels": self._labels,
                "Hostname": string(_HOSTNAME), "Domainname": empty, "WorkingDir": string(_PATH),
                "Env": strings(), "Cmd": strings(), "Entrypoint": strings(),
                "Tty": boolean, "OpenStdin": boolean, "StdinOnce": boolean, "AttachStdin": boolean,
                "AttachStdout": boolean, "AttachStderr": boolean, "NetworkDisabled": boolean,
                "StopSignal": string(_SIGNAL), "StopTimeout": integer(0, 3600),
                "HostConfig": host,
                **dict.fromkeys(("ExposedPorts", "Volumes", "MacAddress", "Healthcheck", "NetworkingConfig",
                                 "Runtime", "OnBuild", "Shell", "ArgsEscaped"), empty),
            },
            required=("Image", "User", "Labels", "HostConfig"),
        )

    def check(self, body: bytes) -> dict[str, Any]:
        """The canonical body to forward for this create body, or :class:`Denied` with the reason."""
        result: dict[str, Any] = self._body(parse_json(body or b"{}"), "")
        memory, swap = result["HostConfig"]["Memory"], result["HostConfig"]["MemorySwap"]
        if swap < memory:
            raise Denied(f"HostConfig.MemorySwap ({swap}) may not be below HostConfig.Memory ({memory})")
        return result

    # --- field checks that need the limits ----------------------------------------------------
    def _user(self, value: Any, where: str) -> str:
        m = _USER.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise Denied(f"{where} must be a numeric uid:gid, not {_short(value)}")
        # a uid the image's passwd lacks would get gid 0 from the runtime: the gid is always explicit
        uid, gid = int(m[1]), int(m[2] or m[1])
        for name, number in (("uid", uid), ("gid", gid)):
            if not self.min_uid <= number <= INT32_MAX:
                raise Denied(f"{where}: {name} {number} is outside the sandbox range "
                             f"[{self.min_uid}, {INT32_MAX}] (sandboxes never run as root)")
        return f"{uid}:{gid}"

    def _labels(self, value: Any, where: str) -> Any:
        labels = string_map(64, text(256, _LABEL), text(4096))(value, where)
        if labels is DROP or labels.get(self.label) != "1":
            raise Denied(f"sandbox containers must carry the label {self.label}=1")
        return labels

    def _cap_drop(self, value: Any, where: str) -> list[str]:
        caps = strings(64, 64)(value, where)
        if caps is DROP or "ALL" not in [c.upper() for c in caps]:
            raise Denied(f"{where} must include ALL")
        return ["ALL"]

    def _security_opt(self, value: Any, where: str) -> list[str]:
        opts = strings(2, 1024 * 1024)(value, where)
        ok = opts is not DROP and len(opts) == 2 and "no-new-privileges" in opts
        profile = next((o for o in opts if o.startswith("seccomp=")), None) if ok else None
        try:
            ok = profile is not None and json.loads(profile[len("seccomp="):]) == self.seccomp_profile
        except ValueError:
            ok = False
        if not ok:
            raise Denied(f"{where} must be exactly codeloop's: no-new-privileges and the shipped seccomp "
                         "profile (runner.hardening.security_opt())")
        return list(self.security_opt)

    def _log_config(self, value: Any, where: str) -> dict[str, Any]:
        obj({"Type": const("none"), "Config": empty}, required=("Type",))(value, where)
        return {"Type": "none", "Config": {}}

    def _ulimit(self, check: Check) -> Check:
        def checked(value: Any, where: str) -> Any:
            limit: dict[str, Any] = check(value, where)
            if limit["Soft"] > limit["Hard"]:
                raise Denied(f"{where}: Soft may not be above Hard")
            if limit["Name"] == "nofile" and limit["Hard"] > 1 << 20:
                raise Denied(f"{where}: nofile may be at most {1 << 20}")
            return limit

        return checked

    def _binds(self, value: Any, where: str) -> Any:
        """Nothing, or exactly the configured wheelhouse, read-only, at WHEELHOUSE_TARGET."""
        if empty_or_none(value):
            return DROP
        allowed = f"{self.wheelhouse}:{WHEELHOUSE_TARGET}:ro"
        if self.wheelhouse is None or not isinstance(value, list) or value != [allowed]:
            only = f"[{allowed!r}]" if self.wheelhouse else "nothing (no wheelhouse configured)"
            raise Denied(f"{where}: a sandbox may bind-mount {only}, not {_short(value)}")
        return [allowed]

    def _only_tmpfs(self, check: Check) -> Check:
        def checked(value: Any, where: str) -> Any:
            kinds = [v for k, v in value if fold(k) == "type"] if isinstance(value, Pairs) else []
            if kinds != ["tmpfs"]:
                raise Denied(f"{where}: only tmpfs mounts (got Type {_short(kinds[-1] if kinds else None)})")
            return check(value, where)

        return checked

    def _mount_target(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _PATH.fullmatch(value) or {".", ".."} & set(value.split("/")):
            raise Denied(f"{where}: mount point {_short(value)} must be a plain absolute path")
        top = value.split("/")[1]
        if top in ("proc", "sys") or (top == "dev" and value != "/dev/shm"):
            raise Denied(f"{where}: nothing may be mounted over {value}")
        return value

    def _tmpfs_options(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or len(value) > 256:
            raise Denied(f"{where}: tmpfs options must be a short string")
        sizes = []
        for option in value.split(","):
            key, eq, val = option.partition("=")
            if not eq and key in _TMPFS_FLAGS:
                continue
            number = val.isascii() and val.isdigit() and len(val) <= 10
            if key == "size":
                try:
                    sizes.append(size_bytes(val))
                except ValueError:
                    sizes.append(0)
            elif not ((key in ("uid", "gid", "nr_inodes") and number) or (key == "mode" and _MODE.fullmatch(val))):
                raise Denied(f"{where}: tmpfs option {option!r} is not allowed")
        if not sizes or not all(0 < size <= self.max_memory for size in sizes):
            raise Denied(f"{where}: tmpfs needs size= of at most {self.max_memory} bytes")
        return value
