"""Settings: one typed object read from the environment (prefix ``CODELOOP_``) and ``./.env``.

Built once at start (``Settings.load()``) and passed down; nothing else reads ``os.environ``.
Secrets are ``SecretStr`` so they never show in a repr or a log line.

Host-run commands (``codeloop doctor``, ``worker``, ``console``…) read ``.env`` in the current
directory, the same file compose hands its services, so a setting written there once holds for
both. Real environment variables win over the file; ``CODELOOP_ENV_FILE`` names another file, or
none when empty. Only ``CODELOOP_*`` lines count: the ``DEPLOY_*`` ones are compose's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.core.errors import ConfigError

DEFAULT_MODEL = "m-a-p/OpenCodeInterpreter-DS-1.3B"
DEFAULT_ENV_FILE = ".env"
#: CODELOOP_SYSTEM_PROMPT=none: send no system turn (the model's chat template applies its own)
NO_SYSTEM_PROMPT = "none"
CSV = Annotated[list[str], NoDecode]
#: a model profile's name (CODELOOP_MODEL_PROFILES): what admins type in the channel command
PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
#: the profile a channel uses when none is chosen: the worker's own backend
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class ModelProfile:
    """A named model endpoint from CODELOOP_MODEL_PROFILES: a TGI / OpenAI-compatible server at
    ``url``, asked for ``model`` (None: CODELOOP_MODEL, as for the default server)."""

    name: str
    url: str
    model: str | None = None


def parse_profile(item: str) -> ModelProfile:
    """``name=url`` or ``name=url|served-name``; ValueError says what is wrong with ``item``."""
    name, eq, rest = item.partition("=")
    name = name.strip().lower()
    if not eq:
        raise ValueError(f"{item!r} is not name=url or name=url|served-name")
    if not PROFILE_NAME.fullmatch(name):
        raise ValueError(f"{item!r}: a profile name is 1-32 of a-z 0-9 _ . - (starting with a letter or digit)")
    if name == DEFAULT_PROFILE:
        raise ValueError(f"{item!r}: {DEFAULT_PROFILE!r} names the worker's own model; pick another name")
    url, bar, served = rest.partition("|")
    url, served = url.strip(), served.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port raises here
    except ValueError:
        raise ValueError(f"{item!r}: {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or any(c.isspace() for c in url):
        raise ValueError(f"{item!r}: {url!r} is not an http(s)://host[:port][/path] URL")
    if bar and (not served or any(c.isspace() or c in "|=" for c in served)):
        raise ValueError(f"{item!r}: the served model name after '|' is empty or has spaces")
    return ModelProfile(name, url.rstrip("/"), served or None)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODELOOP_", extra="ignore", frozen=True,
                                      env_file_encoding="utf-8")

    # --- Redis queue and state -------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "codeloop"
    worker_concurrency: int = Field(8, ge=1, le=1024)
    claim_idle_s: float = Field(60.0, gt=0, description="pending entries idle this long are reclaimed")
    max_deliveries: int = Field(3, ge=1, description="deliveries before an entry is dead-lettered")
    lock_ttl_s: float = Field(30.0, gt=1)
    conversation_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    history_chars: int = Field(200_000, ge=1000, description="stored history per conversation, newest kept")
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    #: Redis behind Sentinel (docs/DEPLOY.md "Redis high availability"): with sentinels set, the
    #: master is asked of them and CODELOOP_REDIS_URL gives only credentials, db and TLS (rediss://)
    redis_sentinels: CSV = Field(default_factory=list, description="sentinels as host:port,host:port")
    redis_sentinel_master: str | None = Field(None, description="the master's name the sentinels monitor")
    redis_sentinel_password: SecretStr | None = Field(None, description="the sentinels' own requirepass")
    redis_sentinel_tls: bool = Field(False, description="TLS to the sentinels")
    redis_sentinel_tls_ca: str | None = Field(None, description="CA file for TLS to the sentinels")
    redis_min_replicas: int = Field(0, ge=0, le=16, description="replicas an enqueue must reach before its ack")
    redis_replica_wait_ms: int = Field(1000, ge=10, description="how long an enqueue waits for those replicas")
    render_lease_s: float = Field(4.0, ge=1.0, le=60.0, description="adapter replicas: a dead replica's "
                                  "jobs are taken over (same messages) after this; renewed every quarter of it")
    stream_maxlen: int = Field(100_000, ge=1000, description="approximate cap on entries kept in a reply stream")
    turn_wait_s: float = Field(600.0, gt=0, description="a job whose predecessor in its thread neither runs "
                               "nor finishes for this long skips it (dead-lettered with the reason)")
    blob_ttl_s: int = Field(3600, ge=60, description="files a job made wait this long for an adapter to show them")
    blob_job_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="bytes of files one job may hand back")
    redis_shed_ratio: float = Field(0.9, gt=0, le=1.0, description="share of Redis's maxmemory at which workers "
                                    "refuse new jobs and files")

    # --- model -----------------------------------------------------------------------------
    llm_backend: Literal["tgi", "transformers"] | None = None  # default: tgi if llm_url else transformers
    llm_url: str | None = None
    llm_token: SecretStr | None = None
    model: str = DEFAULT_MODEL
    max_new_tokens: int = Field(1024, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0 = greedy, as the model family was evaluated
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: CSV = Field(default_factory=lambda: ["<|EOT|>"])
    context_tokens: int = Field(16384, ge=512)
    llm_timeout_s: float = Field(120.0, gt=0)
    llm_retries: int = Field(4, ge=0, le=20)
    llm_backoff_s: float = Field(0.5, ge=0)
    device: str = "auto"  # transformers backend: auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_batch: int = Field(16, ge=1, le=512, description="concurrent sequences in the in-process backend")
    max_rounds: int = Field(3, ge=0, le=20, description="feedback rounds after the first reply")
    #: named endpoints admins may pick per channel (bot/queue/channel_config.py); the default stays above
    model_profiles: CSV = Field(
        default_factory=list,
        description="named model servers for per-channel choice: name=url or name=url|served-name, comma-separated")
    #: empty = codeloop's built-in prompt (bot/agent/prompts.py); "none" = no system turn
    system_prompt: str | None = Field(None, description="system turn of every conversation")
    #: key for `codeloop eval --human-feedback-url` (the critic's OpenAI-compatible server)
    eval_critic_token: SecretStr | None = None

    # --- sandbox (defaults documented in docs/SANDBOX.md) ----------------------------------
    sandbox_image: str = "codeloop-sandbox:latest"
    sandbox_runtime: str | None = None  # e.g. runsc for gVisor
    sandbox_memory: str = "1g"
    sandbox_cpus: float = Field(1.0, gt=0)
    sandbox_pids: int = Field(128, ge=16)
    sandbox_cell_timeout_s: float = Field(30.0, gt=0)
    sandbox_tmp_size: str = "64m"
    sandbox_data_size: str = "256m"
    #: the worker's copy of each thread's /mnt/data (bot/worker/files_store.py), restored into a fresh session
    files_dir: str | None = Field(None, description="per-thread file store; unset: ~/.local/share/codeloop/files")
    sandbox_wheelhouse: str | None = Field(
        None, pattern=r"^(/[A-Za-z0-9._@+-]+)+$",
        description="host directory of wheels that %pip / !pip install from, mounted read-only (no internet)",
    )
    sandbox_nofile: int = Field(256, ge=32)
    sandbox_fsize: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    sandbox_user: str = Field("auto", pattern=r"^(auto|[1-9][0-9]{0,9}(:[1-9][0-9]{0,9})?)$",
                              description="auto: a random uid:gid per sandbox; uid:gid pins one")
    sandbox_idle_ttl_s: float = Field(1800.0, gt=0)
    sandbox_pool_size: int = Field(2, ge=0, le=256)
    sandbox_pool_claim_ttl_s: float = Field(60.0, gt=0, description="a warm container unpinged this long exits")
    sandbox_output_chars: int = Field(20_000, ge=1000, description="output kept inline; the rest as a file")
    sandbox_max_files: int = Field(20, ge=0)
    sandbox_max_file_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    #: all files one cell hands back, together (the host re-checks it; bounds every reply's size)
    sandbox_max_total_file_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    sandbox_labels: CSV = Field(default_factory=list, description="extra container labels, key=value,key=value")
    #: several sandbox hosts (runner/engines.py; docs/DEPLOY.md "Growing past one host")
    sandbox_engines: CSV = Field(
        default_factory=list,
        description="Docker endpoints for sandboxes, name=unix:///path or name=tcp://host:2376 "
                    "(?sessions=N&memory=64g overrides the limits), comma-separated; empty = DOCKER_HOST alone")
    sandbox_engine_sessions: int = Field(100, ge=1, description="sandboxes one engine may hold (all deployments')")
    sandbox_engine_memory: str | None = Field(
        None, pattern=r"^[0-9]+[bkmgt]?$", description="sandbox memory one engine may hold, e.g. 64g; empty = no limit")
    sandbox_engine_tls_dir: str | None = Field(
        None, description="ca.pem, cert.pem, key.pem for tcp:// engines; <dir>/<engine name>/ wins where present")
    sandbox_engine_timeout_s: float = Field(
        20.0, gt=0, description="bound on each call to an engine and on connecting to it (an engine gone silent)")
    #: the worker's janitor (runner/janitor.py): how often it looks, how long a ping may take
    sandbox_reap_interval_s: float = Field(60.0, gt=0, description="host-side reaping of sandboxes, every this long")
    sandbox_ping_timeout_s: float = Field(10.0, gt=0, description="an executor silent this long is unresponsive")

    # --- input limits ------------------------------------------------------------------------
    max_message_chars: int = Field(20_000, ge=100)
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    #: FOR TESTS ONLY (bot/worker/downloads.py): host:port pairs exempt from the download host, https and
    #: public-address rules, with the platform's token sent to them; never set it in production
    download_test_hosts: CSV = Field(
        default_factory=list,
        description="FOR TESTS ONLY: host:port pairs downloads may reach over http with the platform's "
                    "token (the test fakes on loopback); empty in production")
    feedback_chars: int = Field(1000, ge=100, description="output the model sees, head + tail")

    # --- rate limits and fairness (bot/queue/ratelimit.py; 0 turns a bucket off) ------------------
    rate_user_per_min: int = Field(20, ge=0, description="requests a user may start per minute (burst = this)")
    rate_channel_per_min: int = Field(60, ge=0, description="requests a channel may start per minute")
    worker_user_concurrency: int = Field(2, ge=1, description="one user's jobs running at once in a worker")
    rate_reset_per_min: int = Field(3, ge=0, description="resets one user may ask for per minute")
    user_pending_max: int = Field(6, ge=0, description="one user's jobs queued or running at once, checked "
                                  "when an adapter enqueues")

    # --- Slack ------------------------------------------------------------------------------
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_mode: Literal["socket", "http"] = "socket"
    slack_api_url: str = "https://slack.com/api/"
    slack_http_host: str = "0.0.0.0"
    slack_http_port: int = Field(3000, ge=1, le=65535)
    slack_allowed_channels: CSV = Field(default_factory=list)
    slack_allowed_users: CSV = Field(default_factory=list)
    #: None: DMs are answered only when no channel allowlist is set (an allowlist means what it says)
    slack_allow_dms: bool | None = Field(
        None, description="answer direct messages: true | false; empty = only when no channel allowlist is set")
    slack_moderators: CSV = Field(
        default_factory=list,
        description="user ids who may stop, re-run or reset anyone's run (besides workspace admins and owners)")
    #: a first mention inside an existing thread reads its earlier messages (newest kept) for the model
    thread_context_messages: int = Field(30, ge=0, le=200, description="earlier thread messages read; 0 = none")
    thread_context_chars: int = Field(6000, ge=0, le=50_000, description="characters of them the model gets")

    # --- Discord ----------------------------------------------------------------------------
    discord_token: SecretStr | None = None
    discord_api_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str = Field("wss://gateway.discord.gg/", description="Discord gateway WebSocket URL")
    discord_allowed_guilds: CSV = Field(default_factory=list)
    discord_allowed_channels: CSV = Field(default_factory=list)
    discord_user_concurrency: int = Field(2, ge=1)

    # --- operations -------------------------------------------------------------------------
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_channel_label: bool = Field(True, description="usage metrics labelled by channel; false: "
                                        "channel=\"all\" (for deployments with very many channels)")
    usage_retention_days: int = Field(90, ge=1, le=3650, description="days the per-channel and per-user "
                                      "usage counters are kept (`codeloop usage`)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    _split = field_validator(
        "stop",
        "sandbox_labels",
        "sandbox_engines",
        "slack_allowed_channels",
        "slack_allowed_users",
        "slack_moderators",
        "download_test_hosts",
        "discord_allowed_guilds",
        "discord_allowed_channels",
        "redis_sentinels",
        "model_profiles",
        mode="before",
    )(_split_csv)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            host, colon, port = item.rpartition(":")
            if not colon or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port")
        return value

    @field_validator("model_profiles")
    @classmethod
    def _profiles_parse(cls, value: list[str]) -> list[str]:
        names = [parse_profile(item).name for item in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"profile {', '.join(twice)} is named more than once")
        return value

    @field_validator("sandbox_labels")
    @classmethod
    def _labels_are_pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            key, eq, _ = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"{item!r} is not key=value")
        return value

    @field_validator("sandbox_engine_memory", "sandbox_engine_tls_dir", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("slack_allow_dms", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("download_test_hosts")
    @classmethod
    def _hosts_have_ports(cls, value: list[str]) -> list[str]:
        for item in value:
            host, colon, port = item.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ValueError(f"{item!r} is not host:port")
        return value

    @property
    def slack_dms_allowed(self) -> bool:
        if self.slack_allow_dms is not None:
            return self.slack_allow_dms
        return not self.slack_allowed_channels

    @property
    def backend(self) -> Literal["tgi", "transformers"]:
        if self.llm_backend is not None:
            return self.llm_backend
        return "tgi" if self.llm_url else "transformers"

    @property
    def profiles(self) -> dict[str, ModelProfile]:
        """CODELOOP_MODEL_PROFILES by name (checked when the settings were read)."""
        return {p.name: p for p in map(parse_profile, self.model_profiles)}

    def system_turn(self, built_in: str) -> str | None:
        """The system prompt to send: ``built_in`` unless one is set; None for ``none``."""
        value = (self.system_prompt or "").strip()
        if value.lower() == NO_SYSTEM_PROMPT:
            return None
        return value or built_in

    @staticmethod
    def env_file() -> str | None:
        """The settings file commands read: CODELOOP_ENV_FILE, default ./.env; empty for none."""
        path = os.environ.get("CODELOOP_ENV_FILE", DEFAULT_ENV_FILE)
        return path or None

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment and the settings file; a bad value raises ConfigError naming the
        variable. Environment variables take precedence over the file, ``overrides`` over both."""
        try:
            settings = cls(_env_file=cls.env_file(), **overrides)  # type: ignore[arg-type,call-arg]
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = "CODELOOP_" + "_".join(str(p) for p in err["loc"]).upper()
                problems.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
            raise ConfigError("invalid settings: " + "; ".join(problems)) from None
        if settings.backend == "tgi" and not settings.llm_url:
            raise ConfigError("CODELOOP_LLM_URL is required when CODELOOP_LLM_BACKEND=tgi")
        if settings.redis_sentinels and not settings.redis_sentinel_master:
            raise ConfigError("CODELOOP_REDIS_SENTINEL_MASTER is required when CODELOOP_REDIS_SENTINELS is set")
        return settings

    def require(self, *names: str) -> None:
        """Fail with one message naming every missing setting a command needs."""
        missing = [f"CODELOOP_{n.upper()}" for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise ConfigError("missing settings: " + ", ".join(missing))

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix."""
        return ":".join((self.key_prefix, *parts))
