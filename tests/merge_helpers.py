"""Tiny FURINA adapters with non-zero updates, and a float64 reference of the fold formulas."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from furina.adapter import FurinaAdapterConfig, save_adapter
from furina.checkpoint import checkpoint_fingerprint, load_causal_lm
from furina.inject import DEFAULT_TARGET_MODULES, adapter_state_dict, furina_layers, inject_furina
from furina.layer import FurinaHyperparameters
from merger.verify import VerifySettings

HPARAMS = FurinaHyperparameters(r=4, lora_alpha=8.0, num_experts=3, num_shared_experts=1, top_k=1)
# Enough to exercise every check of a verified merge in well under a second per merge.
FAST_VERIFY = VerifySettings(
    prompts=("hello world", "abc"),
    greedy_new_tokens=3,
    latency_new_tokens=2,
    latency_repeats=1,
    latency_warmup=0,
)


def furina_tensors(
    base_dir: Path,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    hparams: FurinaHyperparameters = HPARAMS,
    seed: int = 0,
    magnitude: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Return adapter tensors for base_dir with random non-zero shared B and magnitude.

    A fresh adapter (shared B = 0, magnitude = 0) would fold to a no-op, and a merge
    test on it could not tell a merge from a copy.
    """
    model = load_causal_lm(base_dir)
    inject_furina(model, hparams, target_modules)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in furina_layers(model):
            layer.furina_B.copy_(0.1 * torch.randn(layer.furina_B.shape, generator=generator))
            noise = torch.rand(layer.furina_magnitude.shape, generator=generator)
            layer.furina_magnitude.copy_(magnitude * (0.5 + noise))
    return adapter_state_dict(model)


def adapter_config(
    base_dir: Path,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    hparams: FurinaHyperparameters = HPARAMS,
    fingerprint: str | None = None,
) -> FurinaAdapterConfig:
    return FurinaAdapterConfig(
        base_model_name_or_path=str(base_dir),
        base_model_fingerprint=fingerprint or checkpoint_fingerprint(base_dir),
        r=hparams.r,
        lora_alpha=hparams.lora_alpha,
        use_rslora=hparams.use_rslora,
        num_experts=hparams.num_experts,
        num_shared_experts=hparams.num_shared_experts,
        top_k=hparams.top_k,
        eps=hparams.eps,
        target_modules=list(target_modules),
        selection_loss_weight=0.01,
    )


def write_adapter(
    base_dir: Path,
    adapter_dir: Path,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    hparams: FurinaHyperparameters = HPARAMS,
    seed: int = 0,
    magnitude: float = 0.1,
) -> Path:
    """Save a random non-zero adapter for base_dir, with base_dir's fingerprint."""
    tensors = furina_tensors(base_dir, target_modules, hparams, seed, magnitude)
    config = adapter_config(base_dir, target_modules, hparams)
    return save_adapter(adapter_dir, config, tensors)


def write_raw_adapter(
    adapter_dir: Path, config: FurinaAdapterConfig, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write adapter files without save_adapter's validation (for invalid adapters)."""
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_config.json").write_text(config.model_dump_json(indent=2))
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "furina"})
    return adapter_dir


def reference_delta(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    hparams: FurinaHyperparameters,
) -> torch.Tensor:
    """FURINA's weight update in float64, straight from the formulas, [d_out, d_in].

    Shared experts add s * B_i A_i; routed experts add diag(v) diag(|rows of W_i| + eps)^-1 W_i
    with W_i = B_i A_i formed explicitly (no Gram-matrix shortcut).
    """
    lora_A, lora_B, magnitude = lora_A.double(), lora_B.double(), magnitude.double()
    delta = torch.zeros(lora_B.shape[1], lora_A.shape[2], dtype=torch.float64)
    for expert in range(hparams.num_experts):
        update = lora_B[expert] @ lora_A[expert]  # [d_out, d_in]
        if expert < hparams.num_shared_experts:
            delta += hparams.shared_scaling * update
        else:
            row_norms = update.norm(dim=1, keepdim=True)  # [d_out, 1]
            delta += magnitude.unsqueeze(1) * update / (row_norms + hparams.eps)
    return delta


def leftover_entries(parent: Path, expected: set[str]) -> list[str]:
    """Names in parent other than the expected ones (temporary dirs a merge left behind)."""
    return sorted(entry.name for entry in parent.iterdir() if entry.name not in expected)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
