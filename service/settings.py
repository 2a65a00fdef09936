"""Service settings, read from FURINA_* environment variables and `furina serve` flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, HttpUrl, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Validated service configuration. Each field reads FURINA_<FIELD> from the environment."""

    # An empty variable counts as unset, so docker compose can pass ${FURINA_X:-} through.
    model_config = SettingsConfigDict(env_prefix="FURINA_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(
        default=Path("data"),
        description="root of base/, adapters/, merged/ and the job database jobs.db",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "when set, every endpoint except /health and the web page (/ and /static/) "
            "needs 'Authorization: Bearer <key>'"
        ),
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
        description=(
            "model used when a request names none (default: the demo model when present; "
            "with the openai backend, the first model the engine lists)"
        ),
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
    generation_concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "generations (POST /generate, /v1/completions, /v1/chat/completions) that run at "
            "the same time; two on the same model still take turns"
        ),
    )
    generation_queue_size: int = Field(
        default=8,
        ge=0,
        description="generations that wait for a free slot; further requests get 503",
    )
    generation_queue_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="seconds a generation waits in the queue before it gets 503",
    )
    generation_backend: Literal["local", "openai"] = Field(
        default="local",
        description=(
            "'local' generates in this process with transformers; 'openai' forwards /generate "
            "and /v1/* to the OpenAI-compatible engine at engine_url (vLLM, for example)"
        ),
    )
    engine_url: HttpUrl | None = Field(
        default=None,
        description="base URL of the OpenAI-compatible engine, with /v1 (openai backend only)",
    )
    engine_api_key: SecretStr | None = Field(
        default=None, description="bearer token sent to the engine, when it needs one"
    )
    engine_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="seconds to wait for the engine to connect, and for each read from it",
    )

    @model_validator(mode="after")
    def _engine_url_for_openai(self) -> Settings:
        if self.generation_backend == "openai" and self.engine_url is None:
            raise ValueError(
                "generation_backend 'openai' needs engine_url: set FURINA_ENGINE_URL, "
                "for example http://vllm:8000/v1"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
