"""Settings: one typed object read from the environment (prefix ``CODELOOP_``).

Built once at start (``Settings.load()``) and passed down; nothing else reads ``os.environ``.
Secrets are ``SecretStr`` so they never show in a repr or a log line.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.errors import ConfigError

DEFAULT_MODEL = "m-a-p/OpenCodeInterpreter-DS-1.3B"
CSV = Annotated[list[str], NoDecode]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODELOOP_", extra="ignore", frozen=True)

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
    system_prompt: str | None = None

    # --- sandbox (defaults documented in docs/SANDBOX.md) ----------------------------------
    sandbox_image: str = "codeloop-sandbox:latest"
    sandbox_runtime: str | None = None  # e.g. runsc for gVisor
    sandbox_memory: str = "1g"
    sandbox_cpus: float = Field(1.0, gt=0)
    sandbox_pids: int = Field(128, ge=16)
    sandbox_cell_timeout_s: float = Field(30.0, gt=0)
    sandbox_tmp_size: str = "64m"
    sandbox_data_size: str = "256m"
    sandbox_nofile: int = Field(256, ge=32)
    sandbox_fsize: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    sandbox_user: str = "10001:10001"
    sandbox_idle_ttl_s: float = Field(1800.0, gt=0)
    sandbox_pool_size: int = Field(2, ge=0, le=256)
    sandbox_pool_claim_ttl_s: float = Field(60.0, gt=0, description="a warm container unpinged this long exits")
    sandbox_output_chars: int = Field(20_000, ge=1000, description="output kept inline; the rest as a file")
    sandbox_max_files: int = Field(20, ge=0)
    sandbox_max_file_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    #: all files one cell hands back, together (the host re-checks it; bounds every reply's size)
    sandbox_max_total_file_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    sandbox_labels: CSV = Field(default_factory=list, description="extra container labels, key=value,key=value")

    # --- input limits ------------------------------------------------------------------------
    max_message_chars: int = Field(20_000, ge=100)
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    feedback_chars: int = Field(1000, ge=100, description="output the model sees, head + tail")

    # --- rate limits and fairness (bot/ratelimit.py; 0 turns a bucket off) ------------------
    rate_user_per_min: int = Field(20, ge=0, description="requests a user may start per minute (burst = this)")
    rate_channel_per_min: int = Field(60, ge=0, description="requests a channel may start per minute")
    worker_user_concurrency: int = Field(2, ge=1, description="one user's jobs running at once in a worker")
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

    # --- Discord ----------------------------------------------------------------------------
    discord_token: SecretStr | None = None
    discord_api_url: str = "https://discord.com/api/v10"
    discord_allowed_guilds: CSV = Field(default_factory=list)
    discord_allowed_channels: CSV = Field(default_factory=list)
    discord_user_concurrency: int = Field(2, ge=1)

    # --- operations -------------------------------------------------------------------------
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    _split = field_validator(
        "stop",
        "sandbox_labels",
        "slack_allowed_channels",
        "slack_allowed_users",
        "discord_allowed_guilds",
        "discord_allowed_channels",
        mode="before",
    )(_split_csv)

    @field_validator("sandbox_labels")
    @classmethod
    def _labels_are_pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            key, eq, _ = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"{item!r} is not key=value")
        return value

    @property
    def backend(self) -> Literal["tgi", "transformers"]:
        if self.llm_backend is not None:
            return self.llm_backend
        return "tgi" if self.llm_url else "transformers"

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment; a bad value raises ConfigError naming the variable."""
        try:
            settings = cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = "CODELOOP_" + "_".join(str(p) for p in err["loc"]).upper()
                problems.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
            raise ConfigError("invalid settings: " + "; ".join(problems)) from None
        if settings.backend == "tgi" and not settings.llm_url:
            raise ConfigError("CODELOOP_LLM_URL is required when CODELOOP_LLM_BACKEND=tgi")
        return settings

    def require(self, *names: str) -> None:
        """Fail with one message naming every missing setting a command needs."""
        missing = [f"CODELOOP_{n.upper()}" for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise ConfigError("missing settings: " + ", ".join(missing))

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix."""
        return ":".join((self.key_prefix, *parts))
