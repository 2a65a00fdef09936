"""Measure greedy generation latency of several causal LMs side by side.

How one run is timed: one forward call over the whole prompt (prefill), then the argmax
of the last position gives the first token, and the clock reading at that point is the
time to first token. Then new_tokens - 1 single-token forward calls reuse the KV cache
(forward's `cache` argument, `past_key_values` in older transformers releases), each
followed by an argmax. Decoding is greedy and ignores EOS, so every run produces exactly
new_tokens tokens per sequence, and

    decode time per token = (total time - time to first token) / (new_tokens - 1)

This loop is used instead of `model.generate` on purpose. It times exactly the forward
passes and argmaxes that any engine must run, with an exact prefill boundary. generate
adds logits processors, stopping criteria and cache setup that vary between transformers
releases, and it can be timed per token only through a streamer callback. No tokenizer
work is timed. On CUDA and MPS the device is synchronized before each clock
reading.

Repeats are interleaved: repeat k runs every model once, in turn, before repeat k + 1
starts, so drifts of the machine (clock boost, other processes) affect all models
alike. Warmup runs are interleaved the same way and discarded.

Shape legend: B batch size (rows of input_ids), T prompt tokens, N new tokens.
"""

from __future__ import annotations

import inspect
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

METRICS = ("time_to_first_token_s", "decode_time_per_token_s", "total_time_s", "tokens_per_second")


@dataclass
class LatencyStats:
    """Timings of one model over the measured repeats (warmup excluded), in seconds."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: list[float] = field(default_factory=list)
    decode_time_per_token_s: list[float] = field(default_factory=list)
    total_time_s: list[float] = field(default_factory=list)
    # Median of this model divided by the reference model's median, per metric.
    ratio_to_reference: dict[str, float] | None = None

    @property
    def tokens_per_second(self) -> list[float]:
        """Generated tokens (all sequences of the batch) per second of total time."""
        generated = self.batch_size * self.new_tokens
        return [generated / total for total in self.total_time_s]

    def median(self, metric: str) -> float:
        return statistics.median(getattr(self, metric))

    def p90(self, metric: str) -> float:
        return percentile(getattr(self, metric), 90)

    def to_dict(self) -> dict:
        summary: dict = {
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "repeats": len(self.total_time_s),
        }
        for metric in METRICS:
            summary[metric] = {
                "median": self.median(metric),
                "p90": self.p90(metric),
                "samples": list(getattr(self, metric)),
            }
        summary["ratio_to_reference"] = self.ratio_to_reference
        return summary


def percentile(samples: list[float], percent: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of a non-empty list."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * percent / 100
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def measure_latency(
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
    reference: str | None = "base",
    attention_mask: torch.Tensor | None = None,
) -> dict[str, LatencyStats]:
    """Time greedy generation of new_tokens tokens for every model, interleaved.

    input_ids is [T] or [B, T]: its rows are the batch. attention_mask [B, T] (1 for real
    tokens) is needed only for left-padded batches. Each model runs on its own device.
    When reference names one of the models, every result gets ratio_to_reference.
    """
    _check_arguments(models, new_tokens, repeats, warmup, reference)
    input_ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)  # [B, T]
    batch_size, prompt_tokens = input_ids.shape
    results = {name: LatencyStats(batch_size, prompt_tokens, new_tokens) for name in models}

    for repeat in range(warmup + repeats):
        for name, model in models.items():
            _, first_token_s, total_s = timed_greedy_decode(
                model, input_ids, new_tokens, attention_mask
            )
            if repeat < warmup:
                continue
            stats = results[name]
            stats.time_to_first_token_s.append(first_token_s)
            stats.decode_time_per_token_s.append((total_s - first_token_s) / (new_tokens - 1))
            stats.total_time_s.append(total_s)
        logger.debug("latency repeat %d of %d done", repeat + 1, warmup + repeats)

    if reference is not None:
        _add_ratios(results, reference)
    return results


def greedy_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate exactly new_tokens greedy tokens (EOS ignored); returns [B, N]."""
    input_ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    tokens, _, _ = timed_greedy_decode(model, input_ids, new_tokens, attention_mask)
    return tokens


@torch.inference_mode()
def timed_greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Run one prefill plus new_tokens - 1 cached decode steps on input_ids [B, T].

    Returns (tokens [B, N], time to first token in s, total time in s).
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    generated = []

    _synchronize(device)
    start = time.perf_counter()
    output = model(input_ids=input_ids, **_position_inputs(mask), use_cache=True)
    next_token = output.logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
    _synchronize(device)
    first_token_s = time.perf_counter() - start
    generated.append(next_token)

    cache_argument = _cache_argument(model)
    for _ in range(new_tokens - 1):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_inputs = _position_inputs(mask, last_only=True)
        step_inputs[cache_argument] = _output_cache(output)
        output = model(input_ids=next_token, use_cache=True, **step_inputs)
        next_token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(next_token)

    _synchronize(device)
    total_s = time.perf_counter() - start
    return torch.cat(generated, dim=1).cpu(), first_token_s, total_s


def _position_inputs(mask: torch.Tensor | None, last_only: bool = False) -> dict:
    """Attention mask and position ids that skip left padding, as `generate` computes them."""
    if mask is None:
        return {}
    position_ids = (mask.long().cumsum(dim=-1) - 1).clamp_min(0)  # [B, T]
    if last_only:
        position_ids = position_ids[:, -1:]
    return {"attention_mask": mask, "position_ids": position_ids}


def _cache_argument(model: nn.Module) -> str:
    """Return the KV-cache argument name: transformers 5.25 deprecates past_key_values."""
    parameters = inspect.signature(model.forward).parameters
    # NOTE: wrappers whose forward takes only **kwargs (PeftModel) get the old name, which
    # transformers 5.25 still accepts with a FutureWarning and plans to remove in 5.40.
    return "cache" if "cache" in parameters else "past_key_values"


def _output_cache(output) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _check_arguments(
    models: dict[str, nn.Module], new_tokens: int, repeats: int, warmup: int, reference: str | None
) -> None:
    if not models:
        raise ValueError("models is empty: pass at least one model to time")
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be at least 2 (one prefill token plus decode steps), got {new_tokens}"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    if reference is not None and reference not in models:
        raise ValueError(
            f"reference model {reference!r} is not among the models {sorted(models)}: "
            "pass one of them, or reference=None for no ratios"
        )


def _add_ratios(results: dict[str, LatencyStats], reference: str) -> None:
    reference_stats = results[reference]
    for stats in results.values():
        stats.ratio_to_reference = {
            metric: stats.median(metric) / reference_stats.median(metric) for metric in METRICS
        }


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, for reports next to timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
