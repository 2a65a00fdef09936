"""Inputs the benchmarks build themselves: random FURINA adapters and a large synthetic base.

Latency and merge cost depend only on tensor shapes, so a random adapter with non-zero
magnitudes replaces a trained one. It is built from the checkpoint's safetensors
headers, so no model has to be loaded, even for a base larger than RAM would allow twice.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from furina.adapter import save_adapter
from furina.checkpoint import linear_weight_shapes, read_tensor_index
from furina.inject import matches_target
from furina.train import TrainingConfig, adapter_config_for

logger = logging.getLogger(__name__)

# About 0.98 B parameters (3.9 GB in float32): Llama 3.2 1B widths, 14 decoder layers,
# a 32k vocabulary and untied embeddings.
LARGE_BASE_OPTIONS = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 14,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
LARGE_BASE_SHARD_SIZE = "1GB"


def write_random_adapter(base_dir: Path, output_dir: Path, seed: int = 0) -> Path:
    """Write a FURINA adapter (the training defaults: E=8, S=1, r=16) with random weights.

    Every tensor is non-zero, including the shared experts' B and the magnitudes, so a
    merge changes every targeted weight.
    """
    config = TrainingConfig()
    hparams = config.hyperparameters()
    shapes = linear_weight_shapes(read_tensor_index(base_dir))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (d_out, d_in) in sorted(shapes.items()):
        if not matches_target(path, config.target_modules):
            continue
        bound = 1 / math.sqrt(d_in)
        lora_A = torch.rand(hparams.num_experts, hparams.r, d_in, generator=generator) * 2 - 1
        tensors[f"{path}.furina_A"] = lora_A * bound
        tensors[f"{path}.furina_B"] = (
            torch.randn(hparams.num_experts, d_out, hparams.r, generator=generator) * 0.01
        )
        tensors[f"{path}.furina_magnitude"] = torch.rand(d_out, generator=generator) * 0.01 + 0.01
    if not tensors:
        raise ValueError(f"no targeted linear layer in {base_dir}: expected a Llama-family base")
    save_adapter(output_dir, adapter_config_for(base_dir, config), tensors, overwrite=True)
    return output_dir


def ensure_large_base(cache_dir: Path) -> Path:
    """Return a cached random Llama of about 0.98 B float32 parameters in 1 GB shards.

    Building it takes minutes and about 4 GB of disk and 8 GB of RAM, once: later calls
    reuse the directory. A half-written build is never reused, because the directory
    is renamed into place only after save_pretrained returns.
    """
    from furina.synthetic import write_random_llama

    target = cache_dir / "random-llama-1b"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir / "random-llama-1b.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    started = time.perf_counter()
    logger.info("building the synthetic 1B base in %s (once; minutes)", target)
    write_random_llama(temporary, max_shard_size=LARGE_BASE_SHARD_SIZE, **LARGE_BASE_OPTIONS)
    temporary.rename(target)
    logger.info("built %s in %.0f s", target, time.perf_counter() - started)
    return target
