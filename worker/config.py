"""Settings from the environment and ``.env``, validated at start."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.remote.allowed_hosts import parse_allowed_hosts
from worker.remote.host_keys import parse_rate_limits


class Settings(BaseSettings):
    """Everything Taskman reads from its environment.

    ``DATABASE_URL`` unset means the embedded default. Invalid values fail at
    start with pydantic's message, which names the setting.
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    concurrency: int = Field(default=100, ge=1, le=10_000, alias="TASKMAN_CONCURRENCY")
    per_host_concurrency: int = Field(
        default=10, ge=1, le=1_000, alias="TASKMAN_PER_HOST_CONCURRENCY"
    )
    batch_size: int = Field(default=200, ge=1, le=5_000, alias="TASKMAN_BATCH_SIZE")
    lease_seconds: int = Field(default=60, ge=5, le=3_600, alias="TASKMAN_LEASE_SECONDS")
    poll_timeout_seconds: float = Field(default=30.0, gt=0, le=600, alias="TASKMAN_POLL_TIMEOUT")
    max_response_bytes: int = Field(
        default=1_048_576, ge=1_024, le=104_857_600, alias="TASKMAN_MAX_RESPONSE_BYTES"
    )
    # Steps one answer's reading (all its profile's JMESPath expressions) may take.
    # Compiled response profiles the worker keeps, by the bytes of their JSON text.
    profile_cache_bytes: int = Field(
        default=2 * 1024 * 1024, ge=0, le=1024 * 1024 * 1024, alias="TASKMAN_PROFILE_CACHE_BYTES"
    )
    expression_budget: int = Field(
        default=200_000, ge=1_000, le=100_000_000, alias="TASKMAN_EXPRESSION_BUDGET"
    )
    allow_private_networks: bool = Field(default=False, alias="TASKMAN_ALLOW_PRIVATE_NETWORKS")
    allowed_hosts: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(), alias="TASKMAN_ALLOWED_HOSTS"
    )


    # The edge (taskman edge): who may call it and how much it accepts.
    api_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(), alias="TASKMAN_API_KEYS"
    )
    # Supabase user tokens: ES256/RS256 against the JWKS of SUPABASE_URL's Auth, and/or
    # HS256 with the legacy shared secret. Neither set: only API keys are accepted.
    supabase_url: str | None = Field(default=None, alias="SUPABASE_URL")
    jwt_secret: SecretStr | None = Field(default=None, alias="SUPABASE_JWT_SECRET")
    jwt_audience: str = Field(default="authenticated", alias="SUPABASE_JWT_AUDIENCE")
    # The JWKS: seconds a fetch may take; at most one fetch per refresh interval (unknown
    # kids, Auth down); seconds a fetched key set is used before it is fetched again.
    jwks_timeout_seconds: float = Field(default=5.0, gt=0, le=60, alias="TASKMAN_JWKS_TIMEOUT")
    jwks_refresh_interval_seconds: float = Field(
        default=30.0, gt=0, le=3_600, alias="TASKMAN_JWKS_REFRESH_INTERVAL"
    )
    jwks_max_age_seconds: float = Field(
        default=600.0, gt=0, le=86_400, alias="TASKMAN_JWKS_MAX_AGE"
    )
    edge_pool_size: int = Field(default=10, ge=1, le=200, alias="TASKMAN_EDGE_POOL_SIZE")
    edge_max_body_bytes: int = Field(
        default=2_097_152, ge=1_024, le=104_857_600, alias="TASKMAN_EDGE_MAX_BODY_BYTES"
    )
    # /events: open streams (each holds a socket) per user, and in all.
    events_max_streams_per_user: int = Field(
        default=5, ge=1, le=10_000, alias="TASKMAN_EVENTS_MAX_STREAMS_PER_USER"
    )
    events_max_streams: int = Field(
        default=256, ge=1, le=100_000, alias="TASKMAN_EVENTS_MAX_STREAMS"
    )
    # Unset: /metrics is open, without the per-host series. Set: it needs
    # `Authorization: Bearer <token>` and has them.
    metrics_token: SecretStr | None = Field(default=None, alias="TASKMAN_METRICS_TOKEN")

    # Notifications: Slack alerts and signed completion callbacks, through the outbox.
    slack_webhook_url: SecretStr | None = Field(default=None, alias="SLACK_WEBHOOK_URL")
    slack_bot_token: SecretStr | None = Field(default=None, alias="SLACK_BOT_TOKEN")
    slack_channel: str | None = Field(default=None, alias="SLACK_CHANNEL")
    slack_api_url: str = Field(default="https://slack.com/api/", alias="SLACK_API_URL")
    callback_secret: SecretStr | None = Field(default=None, alias="TASKMAN_CALLBACK_SECRET")
    # The deprecated X-Taskman-Timestamp and X-Taskman-Signature beside the Standard
    # Webhooks headers (docs/callbacks.md says until when).
    callback_legacy_signature: bool = Field(
        default=True, alias="TASKMAN_CALLBACK_LEGACY_SIGNATURE"
    )
    callback_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, alias="TASKMAN_CALLBACK_TIMEOUT"
    )
    outbox_batch_size: int = Field(default=100, ge=1, le=5_000, alias="TASKMAN_OUTBOX_BATCH_SIZE")
    outbox_max_attempts: int = Field(
        default=12, ge=1, le=1_000, alias="TASKMAN_OUTBOX_MAX_ATTEMPTS"
    )
    outbox_retry_base_seconds: float = Field(
        default=5.0, gt=0, le=3_600, alias="TASKMAN_OUTBOX_RETRY_BASE"
    )
    outbox_retry_max_seconds: float = Field(
        default=3_600.0, gt=0, le=86_400, alias="TASKMAN_OUTBOX_RETRY_MAX"
    )
    # A notification still undelivered this long after it was enqueued is given up, even
    # one that spent no attempts (its receiver's circuit open); 0: never by age.
    outbox_max_age_hours: float = Field(
        default=72.0, ge=0, le=87_600, alias="TASKMAN_OUTBOX_MAX_AGE_HOURS"
    )
    # Finished tasks' history, private and schedule rows and delivered notifications
    # are deleted this many days after the task ended; 0 keeps everything.
    retention_days: float = Field(default=30, ge=0, le=36_500, alias="TASKMAN_RETENTION_DAYS")

    # Where the edge is reached from outside: {callback_url} in a submit request is
    # <public_url>/callbacks/<task_id>?token=<the task's callback token>.
    public_url: str | None = Field(default=None, alias="TASKMAN_PUBLIC_URL")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        """An http(s) URL, without a trailing slash; empty is unset."""
        if not value or not value.strip():
            return None
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be the edge's http(s) URL, like https://taskman.example.com")
        if parts.query or parts.fragment:
            raise ValueError("must be a URL without a query or fragment")
        return url

    @field_validator("callback_secret")
    @classmethod
    def _callback_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """A ``whsec_`` secret is base64 after its prefix (Standard Webhooks)."""
        secret = value.get_secret_value() if value else ""
        if secret.startswith("whsec_"):
            try:
                key = base64.b64decode(secret[len("whsec_"):], validate=True)
            except binascii.Error:
                key = b""
            if not key:
                raise ValueError("a whsec_ secret must be base64 after its prefix")
        return value

    @field_validator("supabase_url")
    @classmethod
    def _project_url(cls, value: str | None) -> str | None:
        """``https://<project>.supabase.co``, without a trailing slash; empty is unset."""
        if not value or not value.strip():
            return None
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be the project's URL, like https://<project>.supabase.co")
        if parts.path or parts.query or parts.fragment:
            raise ValueError("must be the project's URL alone, like https://<project>.supabase.co"
                             " (no path: the edge adds /auth/v1/.well-known/jwks.json)")
        return url

    @field_validator("allowed_hosts", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``a, b`` in the environment is the set {a, b}."""
        if isinstance(value, str):
            return frozenset(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_entries(cls, value: frozenset[str]) -> frozenset[str]:
        """``host``, ``host:port`` or ``*.suffix`` entries (worker.remote.allowed_hosts)."""
        return parse_allowed_hosts(value)

    # The worker (taskman worker): retry timing and shutdown.
    retry_base_seconds: float = Field(default=2.0, gt=0, le=3_600, alias="TASKMAN_RETRY_BASE")
    retry_max_seconds: float = Field(default=300.0, gt=0, le=86_400, alias="TASKMAN_RETRY_MAX")
    max_poll_interval_seconds: float = Field(
        default=600.0, ge=1, le=86_400, alias="TASKMAN_MAX_POLL_INTERVAL"
    )
    # No task is polled again sooner than this, whatever the remote or the backoff says.
    min_poll_interval_seconds: float = Field(
        default=1.0, gt=0, le=3_600, alias="TASKMAN_MIN_POLL_INTERVAL"
    )
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, le=3_600, alias="TASKMAN_SHUTDOWN_GRACE"
    )

    # Remote hosts (shared by all workers through the database): the circuit breaker
    # opens after this many consecutive transport errors, 5xx or 429 answers from one
    # host; probes go out after base * 2^n seconds (with jitter, at most the maximum);
    # on closing, the host's tasks resume spread over the resume spread.
    host_failure_threshold: int = Field(
        default=10, ge=1, le=1_000_000, alias="TASKMAN_HOST_FAILURE_THRESHOLD"
    )
    host_cooldown_seconds: float = Field(default=5.0, gt=0, le=3_600, alias="TASKMAN_HOST_COOLDOWN")
    host_max_cooldown_seconds: float = Field(
        default=300.0, gt=0, le=86_400, alias="TASKMAN_HOST_MAX_COOLDOWN"
    )
    host_resume_spread_seconds: float = Field(
        default=5.0, ge=0, le=3_600, alias="TASKMAN_HOST_RESUME_SPREAD"
    )
    # The longest a 429's Retry-After holds its owner's tasks on a host.
    host_max_pause_seconds: float = Field(
        default=300.0, gt=0, le=86_400, alias="TASKMAN_HOST_MAX_PAUSE"
    )
    # host=rate entries (api.example.com=5/s), applied to the hosts table when a worker
    # starts; see worker.remote.host_keys.parse_rate_limits.
    host_rate_limits: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, alias="TASKMAN_HOST_RATE_LIMITS"
    )

    @field_validator("host_rate_limits", mode="before")
    @classmethod
    def _rate_limits(cls, value: object) -> object:
        return parse_rate_limits(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> Settings:
        if self.min_poll_interval_seconds > self.max_poll_interval_seconds:
            raise ValueError("TASKMAN_MIN_POLL_INTERVAL must not exceed TASKMAN_MAX_POLL_INTERVAL")
        if self.host_cooldown_seconds > self.host_max_cooldown_seconds:
            raise ValueError("TASKMAN_HOST_COOLDOWN must not exceed TASKMAN_HOST_MAX_COOLDOWN")
        return self

    # Connections: what DATABASE_URL keeps between transactions, and where LISTEN works.
    # auto: Supabase's transaction pooler (port 6543) is "transaction", anything else
    # "session". Behind a transaction pooler nothing is prepared and nothing is left on
    # the session; without a listen URL there, the worker and /events check for changes
    # every change_check_interval seconds instead of waiting for NOTIFY.
    database_pool_mode: Literal["auto", "session", "transaction"] = Field(
        default="auto", alias="TASKMAN_DATABASE_POOL_MODE"
    )
    listen_database_url: str | None = Field(default=None, alias="TASKMAN_LISTEN_DATABASE_URL")
    change_check_interval: float = Field(
        default=0.5, ge=0.05, le=5.0, alias="TASKMAN_CHANGE_CHECK_INTERVAL"
    )

    @field_validator("database_pool_mode", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value
