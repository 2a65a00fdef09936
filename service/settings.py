"""Service settings, read from FURINA_* environment variables and `furina serve` flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Validated service configuration. Each field reads FURINA_<FIELD> from the environment."""

    model_config = SettingsConfigDict(env_prefix="FURINA_", extra="ignore")

    data_dir: Path = Field(
        default=Path("data"),
        description="root of base/, adapters/, merged/ and the job database jobs.db",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, every endpoint except /health needs 'Authorization: Bearer <key>'",
    )
    merge_concurrency: int = Field(
        default=1, ge=1, le=16, description="merge jobs that run at the same time"
    )
    model_cache_size: int = Field(
        default=2,
        ge=1,
        le=64,
        description="loaded models kept in memory (least recently used are evicted)",
    )
    max_new_tokens_cap: int = Field(
        default=512, ge=1, description="largest max_new_tokens a request may ask for"
    )
    default_model: str | None = Field(
        default=None,
        description="model used when a request names none (default: the demo model when present)",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="largest request body accepted, in bytes"
    )
    merge_delay_seconds: float = Field(
        default=0.0,
        ge=0.0,
        le=60.0,
        description=(
            "test hook: seconds each merge job waits after every tensor, so tests can cancel "
            "or interrupt a running merge on a tiny model; leave at 0 in production"
        ),
    )
    latency_max_prompt_tokens: int = Field(
        default=512, ge=1, description="largest prompt_tokens a POST /latency/compare may ask for"
    )
    latency_max_new_tokens: int = Field(
        default=128, ge=2, description="largest new_tokens a POST /latency/compare may ask for"
    )
    latency_max_repeats: int = Field(
        default=10, ge=1, description="largest repeats a POST /latency/compare may ask for"
    )
    latency_max_total_tokens: int = Field(
        default=20_000,
        ge=1,
        description=(
            "largest token budget of one POST /latency/compare: variants x (repeats + 1 "
            "warmup) x (prompt_tokens + new_tokens)"
        ),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
