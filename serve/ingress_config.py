"""Settings of the HTTP job service (the `Ingress`): limits, dispatcher, auth, storage.

`AppArgs.ingress` (a plain dict from serve_config.yaml) validates into `IngressConfig`. Where a
field is left unset, the matching `CINEVIVID_*` environment variable fills it (database URL, data
dir, mode); secrets (`CINEVIVID_JWT_SECRET`) come only from the environment and are never logged.

    args:
      ingress:
        database_url: postgresql+asyncpg://cv@db/cv  # default $CINEVIVID_DATABASE_URL, else SQLite in data_dir
        data_dir: /var/lib/cinevivid                 # default $CINEVIVID_DATA_DIR (artifacts, SQLite, JWT secret)
        limits:
          max_prompt_chars: 1000       # 400 invalid_request, param prompt        (None: the model's bound)
          max_frames: 33               # 400 invalid_request, param num_frames / seconds
          max_width: 128               # 400 invalid_request, param width / size
          max_height: 128              # 400 invalid_request, param height / size
          max_steps: 50                # 400 invalid_request, param num_inference_steps
          max_upload_bytes: 1000000    # 413 payload_too_large (any request body)
          max_concurrent_jobs_per_user: 4   # 429 too_many_active_jobs + Retry-After (queued + in_progress)
          rate_limit_per_minute: 600   # 429 rate_limit_exceeded + Retry-After (token bucket per user)
          rate_limit_burst: 120
          max_list_limit: 100          # 400 invalid_request, param limit (GET /v1/videos)
        dispatcher:
          max_concurrent_jobs: 2       # jobs one ingress replica runs at once; the rest wait queued
          lease_seconds: 30            # claimed job's lease, renewed every lease/3 while it runs
          max_attempts: 3              # an interrupted job is re-queued until then, then failed
          poll_interval_s: 0.5         # look for queued / expired jobs this often
        auth: {token_ttl_s: 3600}
        poll_after_ms: 1000            # openai-poll-after-ms header: the SDK's poll() interval

The model's own bounds (`ModelConfig.max_*`) always apply; these can only narrow them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.config import default_cache_dir

MIN_JWT_SECRET_BYTES = 32


class LimitsConfig(BaseModel):
    """Per-request and per-user limits. Model bounds (resolution, frames, steps, prompt length)
    come from the model's `ModelConfig`; these narrow them further where set."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_chars: int | None = Field(default=None, ge=1)  # None: the model's max_prompt_chars
    max_frames: int | None = Field(default=None, ge=1)  # None: the model's max_frames
    max_width: int | None = Field(default=None, ge=16)
    max_height: int | None = Field(default=None, ge=16)
    max_steps: int | None = Field(default=None, ge=1)
    max_upload_bytes: int = Field(default=1_000_000, ge=1)  # request body size; larger -> 413
    max_concurrent_jobs_per_user: int = Field(default=4, ge=1)  # queued + in_progress; more -> 429
    rate_limit_per_minute: float = Field(default=600.0, gt=0)  # authenticated requests per user
    rate_limit_burst: int = Field(default=120, ge=1)
    max_list_limit: int = Field(default=100, ge=1)


class DispatcherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent_jobs: int = Field(default=2, ge=1)  # jobs this ingress replica runs at once
    lease_seconds: float = Field(default=30.0, gt=0)  # a claimed job's lease; renewed while it runs
    max_attempts: int = Field(default=3, ge=1)  # claims before an interrupted job is failed
    poll_interval_s: float = Field(default=0.5, gt=0)  # look for queued / expired jobs this often
    progress_write_interval_s: float = Field(default=0.5, ge=0)  # DB progress writes, at most this often
    subscriber_history: int = Field(default=2000, ge=0)  # live events kept per running job for late SSE clients


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_ttl_s: int = Field(default=3600, ge=1)
    issuer: str = "cinevivid"


class IngressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: str | None = None  # default: $CINEVIVID_DATABASE_URL, else SQLite in data_dir
    data_dir: str | None = None  # default: $CINEVIVID_DATA_DIR, else ~/.cache/cinevivid/data
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    health_timeout_s: float = Field(default=5.0, gt=0)
    # `openai-poll-after-ms` on video responses: how often the openai SDK's poll() asks again
    poll_after_ms: int = Field(default=1000, ge=10)
    mode: Literal["embedded", "production"] | None = None  # default: $CINEVIVID_MODE, else embedded

    @classmethod
    def from_args(cls, ingress: dict[str, Any] | None) -> "IngressConfig":
        return cls.model_validate(ingress or {})

    def resolved_mode(self) -> str:
        return self.mode or os.environ.get("CINEVIVID_MODE", "embedded")

    def resolved_data_dir(self) -> Path:
        raw = self.data_dir or os.environ.get("CINEVIVID_DATA_DIR") or str(default_cache_dir() / "data")
        return Path(raw).expanduser()

    def resolved_database_url(self) -> str:
        url = self.database_url or os.environ.get("CINEVIVID_DATABASE_URL")
        if url:
            return url
        return f"sqlite+aiosqlite:///{self.resolved_data_dir() / 'cinevivid.db'}"


class ConfigurationError(RuntimeError):
    """A startup error the operator must fix (e.g. a missing JWT secret in production)."""


def load_jwt_secret(config: IngressConfig) -> str:
    """`CINEVIVID_JWT_SECRET`; required (>= 32 bytes) in production. In the embedded default a
    random secret is generated once and kept in the data dir, so every replica and restart
    agrees on it."""
    secret = os.environ.get("CINEVIVID_JWT_SECRET", "")
    if secret:
        if config.resolved_mode() == "production" and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigurationError(
                f"CINEVIVID_JWT_SECRET is shorter than {MIN_JWT_SECRET_BYTES} bytes; production mode refuses it")
        return secret
    if config.resolved_mode() == "production":
        raise ConfigurationError("CINEVIVID_JWT_SECRET is not set; production mode requires it")
    path = config.resolved_data_dir() / ".jwt_secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".jwt_secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # first writer wins; others read its secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()
