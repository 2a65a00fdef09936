"""Export a FURINA adapter as a standard PEFT LoRA adapter.

Each module's experts fold into one LoRA pair (B [d_out, E*r], A [E*r, d_in]) with
scaling 1 (furina.layer.fold_furina). PEFT scales a LoRA by lora_alpha / r, so the
export sets r = lora_alpha = E*r. Any LoRA-aware engine (PEFT, vLLM) then runs the FURINA
model without FURINA code. Key names follow PEFT 0.21's saved files:
`base_model.model.<module path>.lora_A.weight` [E*r, d_in] and `...lora_B.weight`
[d_out, E*r], without the adapter name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from furina.adapter import AdapterError, FurinaAdapter, FurinaAdapterConfig, load_adapter
from merger.atomic import atomic_output_dir, check_output_dir
from merger.errors import MergeError
from merger.fold import folded_lora

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def peft_key(module_path: str, matrix: str) -> str:
    """Return PEFT's saved key for one LoRA matrix ("lora_A" or "lora_B") of a module."""
    return f"base_model.model.{module_path}.{matrix}.weight"


def peft_lora_config(config: FurinaAdapterConfig) -> dict:
    """Return a PEFT LoraConfig (as adapter_config.json) with scaling lora_alpha / r = 1."""
    rank = config.num_experts * config.r
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": list(config.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_lora_tensors(adapter: FurinaAdapter) -> dict[str, torch.Tensor]:
    """Fold every module of the adapter into float32 PEFT LoRA tensors."""
    tensors = {}
    for path in adapter.module_paths():
        folded_B, folded_A = folded_lora(adapter, path)  # [d_out, E*r], [E*r, d_in]
        for matrix, tensor in (("lora_A", folded_A), ("lora_B", folded_B)):
            if not torch.isfinite(tensor).all():
                raise MergeError(
                    f"folded {matrix} of module {path} contains non-finite values: "
                    "check the adapter's magnitudes"
                )
            tensors[peft_key(path, matrix)] = tensor.to(torch.float32).contiguous()
    return tensors


def export_lora(adapter_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the adapter as a PEFT LoRA directory, atomically; return its path.

    Raises MergeError for an invalid adapter or an existing output without overwrite.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    check_output_dir(output_dir, overwrite, {"adapter": adapter_dir})
    try:
        adapter = load_adapter(adapter_dir)
    except AdapterError as error:
        raise MergeError(str(error)) from error

    tensors = peft_lora_tensors(adapter)
    config = peft_lora_config(adapter.config)
    with atomic_output_dir(output_dir, overwrite) as temporary:
        (temporary / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, temporary / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})

    logger.info(
        "exported %d modules as a rank-%d PEFT LoRA to %s",
        len(adapter.module_paths()),
        config["r"],
        output_dir,
    )
    return output_dir
