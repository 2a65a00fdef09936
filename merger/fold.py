"""Fold a FURINA adapter into base weights: W' = W0 + B A.

`furina.layer.fold_furina` turns one module's experts into a LoRA pair
(B [d_out, E*r], A [E*r, d_in]) with scaling 1. Here that pair is multiplied out and
added to the base weight in FOLD_DTYPE, and the sum is cast once to the output dtype.
"""

from __future__ import annotations

import torch

from furina.adapter import FurinaAdapter
from furina.layer import fold_furina
from merger.errors import MergeError

# float32 as in PEFT's merge: exact enough for 16- and 32-bit outputs, and float32
# matmuls are fast on every CPU (some CPUs have slow bfloat16 matmuls).
FOLD_DTYPE = torch.float32


def folded_lora(
    adapter: FurinaAdapter, module_path: str, dtype: torch.dtype = FOLD_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one module's folded LoRA pair (B [d_out, E*r], A [E*r, d_in]) in dtype."""
    lora_A, lora_B, magnitude = adapter.module_tensors(module_path)
    hparams = adapter.config.hyperparameters()
    return fold_furina(lora_A.to(dtype), lora_B.to(dtype), magnitude.to(dtype), hparams)


def merge_weight(
    base_weight: torch.Tensor,
    adapter: FurinaAdapter,
    module_path: str,
    output_dtype: torch.dtype,
) -> torch.Tensor:
    """Return W0 + B A for one module, computed in FOLD_DTYPE and cast to output_dtype.

    Raises MergeError when the result is non-finite after the cast (NaN, or Inf from
    an overflow of the output dtype), naming the tensor.
    """
    folded_B, folded_A = folded_lora(adapter, module_path)
    merged = base_weight.to(FOLD_DTYPE) + folded_B @ folded_A  # [d_out, d_in]
    merged = merged.to(output_dtype)

    if not torch.isfinite(merged).all():
        if not torch.isfinite(base_weight).all():
            raise MergeError(
                f"base weight {module_path}.weight contains non-finite values (NaN or Inf): "
                "the base checkpoint is damaged; download or convert it again"
            )
        raise MergeError(
            f"merging the adapter into {module_path}.weight gives non-finite values in "
            f"{output_dtype} (NaN, or Inf from overflow): check the adapter's magnitudes, "
            "or write a wider dtype such as float32"
        )
    return merged


def cast_weight(name: str, tensor: torch.Tensor, output_dtype: torch.dtype) -> torch.Tensor:
    """Cast a tensor the adapter does not touch; raise MergeError if the cast overflows."""
    if tensor.dtype == output_dtype:
        return tensor
    cast = tensor.to(output_dtype)
    if (
        output_dtype.is_floating_point
        and not torch.isfinite(cast).all()
        and torch.isfinite(tensor).all()
    ):
        raise MergeError(
            f"casting base tensor {name} from {tensor.dtype} to {output_dtype} overflows to "
            "Inf: write a wider dtype such as float32 or bfloat16"
        )
    return cast
