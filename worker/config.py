"""Settings from the environment and ``.env``, validated at start."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    allow_private_networks: bool = Field(default=False, alias="TASKMAN_ALLOW_PRIVATE_NETWORKS")
    allowed_hosts: frozenset[str] = Field(default=frozenset(), alias="TASKMAN_ALLOWED_HOSTS")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(h.strip().lower() for h in value.split(",") if h.strip())
        return value
