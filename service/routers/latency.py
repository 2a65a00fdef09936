"""POST /latency/compare: a merged model against its base and two unmerged adapters.

All variants run in one engine (transformers, float32, CPU, greedy, exactly new_tokens
tokens, EOS ignored), interleaved and after one warm-up run each, through
merger.latency.measure_latency:

    base               the merged model's base checkpoint
    merged             the merged checkpoint
    furina_unmerged    the base with the FURINA adapter attached at run time
    moe_lora_unmerged  the base with a router MoE-LoRA (MixLoRA, random weights) of the
                       adapter's expert count, rank, top-K and target modules

Each variant is a fresh float32 copy loaded for this comparison, so the comparison
needs up to four times the model's float32 size in memory. Only one comparison runs
at a time (409 otherwise); generation requests that run meanwhile share the CPU and
slow every variant alike.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Literal

import torch
import transformers
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from torch import nn

from furina.adapter import AdapterError, read_adapter_config
from furina.checkpoint import CheckpointError, load_causal_lm, load_tokenizer
from furina.inject import attach_adapter
from merger.latency import LatencyStats, cpu_model, measure_latency
from service.catalog import read_merge_report
from service.errors import (
    ConflictError,
    ServiceError,
    error_responses,
    validation_error_responses,
)
from service.models import ModelEntry, ModelRegistry
from service.paths import Root, resolve_name
from service.routers.generate import invalid_field
from service.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/latency", tags=["latency"])

Variant = Literal["base", "merged", "furina_unmerged", "moe_lora_unmerged"]
VARIANTS: tuple[Variant, ...] = ("base", "merged", "furina_unmerged", "moe_lora_unmerged")
WARMUP_RUNS = 1
# Text repeated to build a prompt of exactly prompt_tokens tokens.
PROMPT_TEXT = (
    "The merged model has the base model's architecture, so it runs at the base model's "
    "speed, while a router mixture of LoRA experts must run its router at every token. "
)
# merger.latency metric names -> names in this response.
METRICS = {
    "time_to_first_token_s": "time_to_first_token",
    "decode_time_per_token_s": "decode_time_per_token",
    "total_time_s": "total",
    "tokens_per_second": "tokens_per_second",
}
# One comparison per process: parallel comparisons would share the CPU and time each other.
_comparison_lock = threading.Lock()


class LatencyRequest(BaseModel):
    """Body of POST /latency/compare."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="merged model name (a directory of merged/)")
    prompt_tokens: int = Field(default=64, ge=1, description="prompt length in tokens")
    new_tokens: int = Field(default=32, ge=2, description="tokens generated per run")
    repeats: int = Field(default=3, ge=1, description="timed runs per variant")
    variants: list[Variant] = Field(default=list(VARIANTS), min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[Variant]) -> list[Variant]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants contains duplicates: {variants}")
        return variants


class Statistic(BaseModel):
    median: float
    p90: float


class VariantLatency(BaseModel):
    """Timings of one variant in seconds (tokens_per_second in tokens per second)."""

    time_to_first_token: Statistic
    decode_time_per_token: Statistic
    total: Statistic
    tokens_per_second: Statistic
    ratio_to_base: dict[str, float] | None = Field(
        description="median of this variant / median of base, per metric; null without base"
    )


class Machine(BaseModel):
    cpu_model: str
    cpu_count: int | None
    torch_threads: int
    torch_version: str
    transformers_version: str
    platform: str


class LatencyResponse(BaseModel):
    model: str
    base_model: str
    adapter: str
    prompt_tokens: int
    new_tokens: int
    repeats: int
    warmup: int
    engine: str
    variants: dict[str, VariantLatency]
    moe_lora: dict | None = Field(description="the MoE-LoRA baseline, when it was timed")
    notes: list[str]
    machine: Machine
    seconds: float = Field(description="wall time of the whole comparison, loading included")


class MixLoraUnavailable(ServiceError):
    """The mixlora package is not installed, so moe_lora_unmerged cannot be built."""

    status_code = 501


class UnsupportedComparison(ServiceError):
    """A model that this comparison cannot handle: not merged, or no MixLoRA counterpart."""

    status_code = 422


@router.post(
    "/compare",
    response_model=LatencyResponse,
    summary="Time base, merged and unmerged variants of a merged model side by side",
    responses={**error_responses(400, 404, 409, 413), **validation_error_responses()},
)
async def compare(body: LatencyRequest, request: Request) -> LatencyResponse:
    settings: Settings = request.app.state.settings
    registry: ModelRegistry = request.app.state.models
    _check_caps(body, settings)
    entry = await run_in_threadpool(registry.resolve, body.model)
    if entry.root != Root.MERGED:
        raise UnsupportedComparison(
            f"model {body.model!r} is a base model: compare a merged model, which records "
            "its base and adapter in merge_report.json"
        )

    if not _comparison_lock.acquire(blocking=False):
        raise ConflictError("another latency comparison is running: retry when it has finished")
    try:
        return await run_in_threadpool(run_comparison, settings, entry, body)
    finally:
        _comparison_lock.release()


def run_comparison(settings: Settings, entry: ModelEntry, body: LatencyRequest) -> LatencyResponse:
    """Load the requested variants, time them, and build the response (blocks for seconds)."""
    started = time.perf_counter()
    base_dir, adapter_dir = merge_sources(settings.data_dir, entry)
    tokenizer = load_tokenizer(entry.path)
    variants = [name for name in VARIANTS if name in body.variants]
    logger.info(
        "latency comparison of %s: variants %s, %d prompt tokens, %d new tokens, %d repeats",
        entry.id,
        ", ".join(variants),
        body.prompt_tokens,
        body.new_tokens,
        body.repeats,
    )

    models, moe_lora = _load_variants(variants, entry.path, base_dir, adapter_dir)
    try:
        _check_context(models, body)
        input_ids = synthetic_prompt(tokenizer, body.prompt_tokens)
        reference = "base" if "base" in models else None
        stats = measure_latency(
            models, input_ids, body.new_tokens, body.repeats, WARMUP_RUNS, reference
        )
    finally:
        models.clear()
        gc.collect()

    seconds = time.perf_counter() - started
    logger.info("latency comparison of %s finished in %.1f s", entry.id, seconds)
    return LatencyResponse(
        model=entry.id,
        base_model=base_dir.name,
        adapter=adapter_dir.name,
        prompt_tokens=body.prompt_tokens,
        new_tokens=body.new_tokens,
        repeats=body.repeats,
        warmup=WARMUP_RUNS,
        engine=f"transformers {transformers.__version__}, float32, CPU, greedy, EOS ignored",
        variants={name: _variant_latency(stats[name]) for name in variants},
        moe_lora=moe_lora,
        notes=_notes(variants),
        machine=machine_info(),
        seconds=seconds,
    )


def merge_sources(data_dir: Path, entry: ModelEntry) -> tuple[Path, Path]:
    """Find the base and adapter a merged model came from, by name inside the data dir.

    merge_report.json records the paths the merge read; only their last component is
    used, resolved inside base/ and adapters/, so a report cannot point outside them.
    """
    report = read_merge_report(entry.path)
    if report is None or not isinstance(report.get("base_dir"), str):
        raise UnsupportedComparison(
            f"merged model {entry.id!r} has no readable merge_report.json with base_dir and "
            "adapter_dir: merge it again with POST /merge to compare it"
        )
    base_name = Path(report["base_dir"]).name
    adapter_name = Path(str(report.get("adapter_dir"))).name
    base_dir = resolve_name(data_dir, Root.BASE, base_name)
    adapter_dir = resolve_name(data_dir, Root.ADAPTERS, adapter_name)
    if not (base_dir / "config.json").is_file():
        raise ConflictError(
            f"base model {base_name!r}, which {entry.id!r} was merged from, is not in base/"
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConflictError(
            f"adapter {adapter_name!r}, which {entry.id!r} was merged from, is not in adapters/"
        )
    return base_dir, adapter_dir


def synthetic_prompt(tokenizer, prompt_tokens: int) -> torch.Tensor:
    """Return token ids [prompt_tokens] of PROMPT_TEXT repeated, without special tokens."""
    token_ids: list[int] = []
    chunk = tokenizer(PROMPT_TEXT, add_special_tokens=False).input_ids
    while len(token_ids) < prompt_tokens:
        token_ids.extend(chunk)
    return torch.tensor(token_ids[:prompt_tokens])


def machine_info() -> Machine:
    """Describe the machine: CPU model (/proc/cpuinfo on Linux), cores, torch threads, versions."""
    return Machine(
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        platform=platform.platform(),
    )


def _check_caps(body: LatencyRequest, settings: Settings) -> None:
    caps = (
        ("prompt_tokens", body.prompt_tokens, settings.latency_max_prompt_tokens, "PROMPT_TOKENS"),
        ("new_tokens", body.new_tokens, settings.latency_max_new_tokens, "NEW_TOKENS"),
        ("repeats", body.repeats, settings.latency_max_repeats, "REPEATS"),
    )
    for field, value, cap, variable in caps:
        if value > cap:
            raise invalid_field(
                field,
                f"{field} is {value}, above this server's cap of {cap} "
                f"(FURINA_LATENCY_MAX_{variable})",
            )

    runs = len(body.variants) * (body.repeats + WARMUP_RUNS)
    budget = runs * (body.prompt_tokens + body.new_tokens)
    if budget > settings.latency_max_total_tokens:
        raise invalid_field(
            "repeats",
            f"this comparison processes {budget} tokens ({len(body.variants)} variants x "
            f"{body.repeats + WARMUP_RUNS} runs x {body.prompt_tokens + body.new_tokens} tokens), "
            f"above this server's budget of {settings.latency_max_total_tokens} "
            "(FURINA_LATENCY_MAX_TOTAL_TOKENS): lower repeats, tokens or variants",
        )


def _load_variants(
    variants: list[str], merged_dir: Path, base_dir: Path, adapter_dir: Path
) -> tuple[dict[str, nn.Module], dict | None]:
    """Load a fresh float32 model per variant; return them and the MoE-LoRA description."""
    models: dict[str, nn.Module] = {}
    moe_lora = None
    try:
        for name in variants:
            if name == "merged":
                models[name] = load_causal_lm(merged_dir)
                continue
            model = load_causal_lm(base_dir)
            if name == "furina_unmerged":
                attach_adapter(model, adapter_dir)
            elif name == "moe_lora_unmerged":
                moe_lora = _attach_moe_lora(model, adapter_dir)
            models[name] = model
    except (AdapterError, CheckpointError) as error:
        raise ConflictError(f"cannot load a variant for the comparison: {error}") from error
    return models, moe_lora


def _attach_moe_lora(model: nn.Module, adapter_dir: Path) -> dict:
    try:
        import mixlora  # noqa: F401  (fail here, with an install hint, when it is missing)

        from service.moe_lora import MoeLoraSpec, attach_random_moe_lora
    except ImportError as error:
        raise MixLoraUnavailable(
            f"moe_lora_unmerged needs the mixlora package ({error}): install it with "
            "`pip install mixlora==0.2.3`, or leave moe_lora_unmerged out of variants"
        ) from error

    try:
        spec = MoeLoraSpec.matching_adapter(read_adapter_config(adapter_dir))
        attach_random_moe_lora(model, spec)
    except ValueError as error:
        raise UnsupportedComparison(f"no MoE-LoRA counterpart for this model: {error}") from error
    return spec.describe()


def _check_context(models: dict[str, nn.Module], body: LatencyRequest) -> None:
    model = next(iter(models.values()))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and body.prompt_tokens + body.new_tokens > limit:
        raise invalid_field(
            "prompt_tokens",
            f"prompt_tokens + new_tokens is {body.prompt_tokens + body.new_tokens}, above "
            f"the model's context length of {limit}",
        )


def _variant_latency(stats: LatencyStats) -> VariantLatency:
    values = {
        name: Statistic(median=stats.median(metric), p90=stats.p90(metric))
        for metric, name in METRICS.items()
    }
    ratios = None
    if stats.ratio_to_reference is not None:
        ratios = {METRICS[metric]: ratio for metric, ratio in stats.ratio_to_reference.items()}
    return VariantLatency(**values, ratio_to_base=ratios)


def _notes(variants: list[str]) -> list[str]:
    notes = []
    if "moe_lora_unmerged" in variants:
        notes.append(
            "moe_lora_unmerged uses random weights (MixLoRA with a random router and random "
            "experts): its timings are meaningful, its outputs are not"
        )
    if "base" not in variants:
        notes.append("base was not timed, so ratio_to_base is null")
    return notes
