"""Check a merged checkpoint: its structure against the base, and its outputs against the adapter.

The structural check reads only config.json, the index and the safetensors headers.
The numerical check loads three float32 models (the merged checkpoint with plain
`AutoModelForCausalLM`, the base, and the base with the adapter attached unmerged),
so it needs about three times the float32 model size in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from furina.checkpoint import (
    INDEX_FILE,
    load_causal_lm,
    load_tokenizer,
    read_tensor_index,
    weight_files,
)
from furina.inject import attach_adapter
from merger.errors import MergeError
from merger.latency import greedy_tokens, measure_latency
from merger.plan import CONFIG_DTYPE_KEYS, CONFIG_FILE, MergePlan
from merger.stream import TensorSpec, torch_dtype

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 17 times 3? Answer:",
)
# Largest accepted max |merged - unmerged| / max |unmerged| over the logits, per output
# dtype. A float32 merge differs from the unmerged model by rounding only. A 16-bit merge
# also rounds every weight once. Measured on SmolLM2-135M-Instruct (float32 base, random
# adapter with r=16, 8 experts): 1.7e-6 for float32, 1.5e-3 for float16, 5.1e-3 for
# bfloat16. NOTE: the 16-bit limits are about ten times those single measurements.
RELATIVE_TOLERANCE = {
    torch.float64: 1e-4,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


@dataclass(frozen=True)
class VerifySettings:
    """How much work the numerical check and the latency comparison do."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    greedy_new_tokens: int = 8
    latency_new_tokens: int = 8
    latency_repeats: int = 3
    latency_warmup: int = 1


def check_structure(plan: MergePlan, merged_dir: Path) -> dict:
    """Compare the merged checkpoint's headers, index and config with the base's."""
    base = read_tensor_index(plan.base_dir)
    merged = read_tensor_index(merged_dir)
    expected_names = set(base) | set(plan.untied)

    report = {
        "tensor_count": _compare(len(base), len(merged)),
        "names": _compare_names(base, merged, plan.untied),
        "shapes": _compare_shapes(base, merged, plan.untied),
        "dtypes": _compare_dtypes(base, merged, plan),
        "parameter_count": _compare(_parameter_count(base), _parameter_count(merged)),
        "shards": _compare(weight_files(plan.base_dir), weight_files(merged_dir)),
        "index_total_size": _check_total_size(merged_dir, merged),
        "config": _compare_config(plan, merged_dir),
        "files_copied": _check_copied_files(plan, merged_dir),
    }
    if plan.untied:
        report["note"] = (
            f"untied {sorted(plan.untied)} from {sorted(set(plan.untied.values()))}: the "
            "adapter changes the output head but not the input embeddings, so the merged "
            "checkpoint stores both and has more stored parameters than the base"
        )

    report["passed"] = (
        set(merged) == expected_names
        and report["shapes"]["identical"]
        and report["dtypes"]["identical"]
        and report["shards"]["identical"]
        and report["index_total_size"]["correct"]
        and report["config"]["as_expected"]
        and not report["files_copied"]["missing"]
    )
    return report


def _compare(base: object, merged: object) -> dict:
    return {"base": base, "merged": merged, "identical": base == merged}


def _compare_names(base: dict, merged: dict, untied: dict[str, str]) -> dict:
    return {
        "identical": set(base) == set(merged),
        "missing": sorted(set(base) - set(merged)),
        "extra": sorted(set(merged) - set(base)),
        "expected_extra": sorted(untied),
    }


def _compare_shapes(base: dict, merged: dict, untied: dict[str, str]) -> dict:
    mismatched = []
    for name, info in merged.items():
        source = untied.get(name, name)
        if source in base and base[source].shape != info.shape:
            mismatched.append(
                {"name": name, "base": list(base[source].shape), "merged": list(info.shape)}
            )
    return {"identical": not mismatched, "mismatched": mismatched}


def _compare_dtypes(base: dict, merged: dict, plan: MergePlan) -> dict:
    """Compare with the base's dtypes, or with the requested dtype for float tensors."""
    mismatched = []
    for name, info in merged.items():
        expected = torch_dtype(base[plan.untied.get(name, name)].dtype)
        if plan.output_dtype is not None and expected.is_floating_point:
            expected = plan.output_dtype
        if torch_dtype(info.dtype) != expected:
            mismatched.append({"name": name, "expected": str(expected), "merged": info.dtype})

    compared_against = "base dtypes"
    if plan.output_dtype is not None:
        compared_against = f"requested {plan.output_dtype} for float tensors, base dtypes otherwise"
    return {
        "identical": not mismatched,
        "compared_against": compared_against,
        "mismatched": mismatched,
    }


def _parameter_count(index: dict) -> int:
    total = 0
    for info in index.values():
        count = 1
        for size in info.shape:
            count *= size
        total += count
    return total


def _check_total_size(merged_dir: Path, merged: dict) -> dict:
    index_path = merged_dir / INDEX_FILE
    if not index_path.is_file():
        return {"recorded": None, "actual": None, "correct": True}
    recorded = json.loads(index_path.read_text())["metadata"]["total_size"]
    actual = sum(
        TensorSpec(name, torch_dtype(info.dtype), info.shape).nbytes
        for name, info in merged.items()
    )
    return {"recorded": recorded, "actual": actual, "correct": recorded == actual}


def _compare_config(plan: MergePlan, merged_dir: Path) -> dict:
    base_config = json.loads((plan.base_dir / CONFIG_FILE).read_text())
    merged_config = json.loads((merged_dir / CONFIG_FILE).read_text())
    changed = sorted(
        key
        for key in set(base_config) | set(merged_config)
        if base_config.get(key) != merged_config.get(key)
    )
    allowed = set(plan.config_changed_keys) | (
        set(CONFIG_DTYPE_KEYS) if plan.output_dtype else set()
    )
    return {
        "identical": not changed,
        "changed_keys": changed,
        "as_expected": set(changed) <= allowed,
    }


def _check_copied_files(plan: MergePlan, merged_dir: Path) -> dict:
    missing = [name for name in plan.copied_files if not (merged_dir / name).exists()]
    return {"files": plan.copied_files, "missing": missing}


def load_models(plan: MergePlan, merged_dir: Path) -> dict[str, nn.Module]:
    """Load the merged checkpoint, the base, and the base with the adapter unmerged, float32."""
    unmerged = attach_adapter(load_causal_lm(plan.base_dir, torch.float32), plan.adapter_dir)
    return {
        "base": load_causal_lm(plan.base_dir, torch.float32),
        "merged": load_causal_lm(merged_dir, torch.float32),
        "furina_unmerged": unmerged,
    }


def check_numerics(plan: MergePlan, models: dict[str, nn.Module], settings: VerifySettings) -> dict:
    """Compare merged, unmerged and base logits and greedy generations on fixed prompts.

    Raises MergeError when the merged logits are non-finite or differ from the unmerged
    adapter's by more than RELATIVE_TOLERANCE for the output dtype.
    """
    prompts = _tokenize_prompts(plan.base_dir, settings.prompts)
    numerical = _compare_outputs(models, prompts, settings.greedy_new_tokens)
    numerical["prompts"] = list(settings.prompts)
    numerical["relative_tolerance"] = _tolerance(plan)
    numerical["within_tolerance"] = numerical[
        "max_rel_logit_diff_merged_vs_unmerged"
    ] <= _tolerance(plan)
    _raise_on_mismatch(numerical)
    return numerical


def compare_latency(
    plan: MergePlan, models: dict[str, nn.Module], settings: VerifySettings
) -> dict:
    """Time base, merged and unmerged models on the first prompt, interleaved."""
    prompt = _tokenize_prompts(plan.base_dir, settings.prompts[:1])[0]
    stats = measure_latency(
        models,
        prompt,
        settings.latency_new_tokens,
        settings.latency_repeats,
        warmup=settings.latency_warmup,
        reference="base",
    )
    return {
        "method": "interleaved repeats of one prefill forward plus cached greedy decode steps "
        "(merger.latency); float32 on CPU threads of this process; times in seconds",
        "reference": "base",
        "variants": {name: variant.to_dict() for name, variant in stats.items()},
    }


def _tolerance(plan: MergePlan) -> float:
    dtypes = {
        tensor.dtype for shard in plan.shards for tensor in shard.tensors if tensor.module_path
    }
    return max(
        RELATIVE_TOLERANCE.get(dtype, RELATIVE_TOLERANCE[torch.bfloat16]) for dtype in dtypes
    )


def _tokenize_prompts(base_dir: Path, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    """Token ids [1, T] of each prompt, with the base's own tokenizer."""
    try:
        tokenizer = load_tokenizer(base_dir)
    except (OSError, ValueError) as error:
        raise MergeError(
            f"cannot load the tokenizer of {base_dir} for the numerical check ({error}): "
            "add the tokenizer files to the base directory, or skip the check (--no-verify)"
        ) from error
    encoded = [tokenizer(prompt, return_tensors="pt")["input_ids"] for prompt in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if ids.shape[1] == 0:
            raise MergeError(f"verification prompt {prompt!r} tokenizes to no tokens")
    return encoded


@torch.inference_mode()
def _compare_outputs(
    models: dict[str, nn.Module], prompts: list[torch.Tensor], new_tokens: int
) -> dict:
    max_abs = max_reference = max_base_diff = 0.0
    finite = True
    greedy_identical = []
    for input_ids in prompts:
        logits = {name: model(input_ids=input_ids).logits for name, model in models.items()}
        merged, unmerged = logits["merged"], logits["furina_unmerged"]  # [1, T, vocab]
        finite = finite and bool(torch.isfinite(merged).all())
        max_abs = max(max_abs, (merged - unmerged).abs().max().item())
        max_reference = max(max_reference, unmerged.abs().max().item())
        max_base_diff = max(max_base_diff, (merged - logits["base"]).abs().max().item())

        merged_tokens = greedy_tokens(models["merged"], input_ids, new_tokens)
        unmerged_tokens = greedy_tokens(models["furina_unmerged"], input_ids, new_tokens)
        greedy_identical.append(bool(torch.equal(merged_tokens, unmerged_tokens)))

    return {
        "dtype": "float32",
        "prompt_token_counts": [int(ids.shape[1]) for ids in prompts],
        "logits_finite": finite,
        "max_abs_logit_diff_merged_vs_unmerged": max_abs,
        # Relative to the largest unmerged logit: elementwise ratios explode near zero.
        "max_rel_logit_diff_merged_vs_unmerged": max_abs / max(max_reference, 1e-30),
        "max_abs_logit_diff_merged_vs_base": max_base_diff,
        "merged_differs_from_base": max_base_diff > 0,
        "greedy_new_tokens": new_tokens,
        "greedy_identical": all(greedy_identical),
        "greedy_identical_per_prompt": greedy_identical,
    }


def _raise_on_mismatch(numerical: dict) -> None:
    if not numerical["logits_finite"]:
        raise MergeError("the merged model produces non-finite logits: the merge is unusable")
    if not numerical["within_tolerance"]:
        raise MergeError(
            "merged logits differ from the unmerged adapter's by "
            f"{numerical['max_rel_logit_diff_merged_vs_unmerged']:.3g} relative "
            f"(tolerance {numerical['relative_tolerance']:.3g}): write float32 "
            "(--dtype float32) or report the adapter and base that cause this"
        )
    if not numerical["merged_differs_from_base"]:
        logger.warning(
            "merged logits equal the base model's: the adapter has no effect "
            "(untrained adapter, or all magnitudes and shared B are zero)"
        )
