"""A router MoE-LoRA baseline for latency comparisons: MixLoRA with random weights.

FURINA exists to remove the router of MoE-LoRA methods, so the latency comparison
needs an unmerged router MoE-LoRA next to it. This module builds one with the `mixlora`
package (0.2.3, the MixLoRA authors' release on PyPI; Li et al., "MixLoRA: Enhancing
Large Language Models Fine-Tuning with LoRA-based Mixture of Experts", arXiv:2404.15159).
MixLoRA's design, per decoder layer:

- attention: each targeted projection gets one plain LoRA,
  y = W0 x + s B A x with s = lora_alpha / r;
- MLP: a linear router [E, d_model] scores E experts per token, the top-K softmax
  probabilities are renormalised to sum to 1, and expert e is the base MLP whose
  targeted projections carry their own LoRA (A_e, B_e):
  y = sum_{e in topK} p_e * down_e(act(gate_e(x)) * up_e(x)).

The weights are random (no MixLoRA model is trained here): timings depend only on the
shapes, and the expert count, rank, top-K and target modules come from the FURINA
adapter it is compared with.

Shape legend: E experts, r rank, d_in / d_out input / output features of a projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_MIXLORA_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Llama-style decoder layers (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), the
# layout mixlora 0.2.3 handles with its `_llama_forward`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
# mixlora asserts a positive dropout; dropout is inactive in eval mode, where timing runs.
LORA_DROPOUT = 0.05
# Standard deviation of the random router weights: MixLoRA's default router_init_range.
ROUTER_INIT_STD = 0.02
# Standard deviation of the random lora_B weights. Any non-zero value times the same
# matmuls; a small one keeps the random model's activations finite.
LORA_B_INIT_STD = 0.02


@dataclass(frozen=True)
class MoeLoraSpec:
    """Size of the MoE-LoRA: E experts of rank r, top-K routing, on these projections."""

    num_experts: int
    top_k: int
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        unknown = [name for name in self.target_modules if name not in _MIXLORA_PROJECTIONS]
        if unknown or not self.target_modules:
            raise ValueError(
                f"MixLoRA places LoRA only on {', '.join(_MIXLORA_PROJECTIONS)}, "
                f"got target modules {list(self.target_modules)}"
            )

    @classmethod
    def matching_adapter(cls, adapter_config) -> MoeLoraSpec:
        """Take E, K, r, lora_alpha and the targets of a FurinaAdapterConfig.

        Targets are reduced to the projection names MixLoRA supports (last path
        component). A FURINA adapter that targets only other layers has no MixLoRA
        counterpart, and the spec raises ValueError.
        """
        names = {target.rsplit(".", 1)[-1] for target in adapter_config.target_modules}
        known = tuple(name for name in _MIXLORA_PROJECTIONS if name in names)
        return cls(
            num_experts=adapter_config.num_experts,
            top_k=min(adapter_config.top_k, adapter_config.num_experts),
            r=adapter_config.r,
            # mixlora 0.2.3 asserts an int lora_alpha.
            lora_alpha=max(1, round(adapter_config.lora_alpha)),
            target_modules=known or tuple(adapter_config.target_modules),
        )

    def describe(self) -> dict:
        attention = [name for name in self.target_modules if name in ATTENTION_PROJECTIONS]
        mlp = [name for name in self.target_modules if name in MLP_PROJECTIONS]
        return {
            "implementation": "mixlora 0.2.3 (MixLoRA, arXiv:2404.15159)",
            "weights": "random",
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "attention_lora_modules": attention,
            "mlp_expert_modules": mlp,
            "router": "linear router on every decoder layer's MLP input, top-K of E experts",
        }


def attach_random_moe_lora(model: nn.Module, spec: MoeLoraSpec, seed: int = 0) -> dict:
    """Inject a random-weight MixLoRA into a Llama-family model in place; return its weights.

    The model is put in eval mode (MixLoRA's LoRA dropout must be off for inference).
    Raises ValueError for a model type MixLoRA does not support.

    NOTE: mixlora 0.2.3 adds the router to every MLP even when no MLP projection is
    targeted. Each expert is then the plain base MLP, run once for each of the top-K picks.
    """
    import mixlora

    weights = random_moe_lora_weights(model, spec, seed)
    config = mixlora_config(model, spec)
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    _eval_unregistered_experts(model)
    return weights


def _eval_unregistered_experts(model: nn.Module) -> None:
    """Switch off the LoRA dropout of mixlora's MLP experts, which model.eval() misses.

    mixlora 0.2.3 keeps each MLP's MoE layer in a plain dict (`mlp.mixlora_moes`) and
    its experts in another (`experts_`), so they are not submodules: `model.eval()` and
    `model.to()` never reach them, and their dropout stays active at inference.
    """
    for layer in model.model.layers:
        for moe_layer in getattr(layer.mlp, "mixlora_moes", {}).values():
            moe_layer.eval()
            for expert in moe_layer.experts_.values():
                expert.eval()


def mixlora_config(model: nn.Module, spec: MoeLoraSpec):
    """Build and check the mixlora.MixLoraConfig for this model and spec."""
    import mixlora

    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"MixLoRA supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}"
        )
    config = mixlora.MixLoraConfig.from_config(
        {
            "base_model_name_or_path": model.config.name_or_path or "in-memory model",
            "task_type": "CAUSAL_LM",
            "peft_type": "MIXLORA",
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "lora_dropout": LORA_DROPOUT,
            "target_modules": list(spec.target_modules),
            "routing_strategy": "mixlora",
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "router_init_range": ROUTER_INIT_STD,
            # mixlora 0.2.3 leaves the activation unset (and fails) unless it is named.
            "act_fn": model.config.hidden_act,
        }
    )
    config.adapter_name_ = "default"
    config.dtype_ = next(model.parameters()).dtype
    return config.check()


def random_moe_lora_weights(
    model: nn.Module, spec: MoeLoraSpec, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random MixLoRA weights keyed as mixlora expects, in the model's dtype.

    lora_A [r, d_in] is uniform in +-1/sqrt(d_in) (LoRA's Kaiming init), lora_B
    [d_out, r] and the router [E, d_model] are normal with small standard deviations.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    weights = {}
    for index, layer in enumerate(model.model.layers):
        prefix = f"mixlora.layers.{index}"
        for name in spec.target_modules:
            if name in ATTENTION_PROJECTIONS:
                linear = getattr(layer.self_attn, name)
                weights.update(_lora_pair(f"{prefix}.self_attn.{name}", linear, spec.r, generator))

        hidden_size = model.config.hidden_size
        router = torch.randn(spec.num_experts, hidden_size, generator=generator) * ROUTER_INIT_STD
        weights[f"{prefix}.mlp.moe_gate.weight"] = router
        for name in spec.target_modules:
            if name in MLP_PROJECTIONS:
                linear = getattr(layer.mlp, name)
                for expert in range(spec.num_experts):
                    key = f"{prefix}.mlp.{name}.experts.{expert}"
                    weights.update(_lora_pair(key, linear, spec.r, generator))
    return {key: tensor.to(dtype) for key, tensor in weights.items()}


def _lora_pair(
    key: str, linear: nn.Linear, r: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    bound = 1 / math.sqrt(linear.in_features)
    lora_A = (torch.rand(r, linear.in_features, generator=generator) * 2 - 1) * bound
    lora_B = torch.randn(linear.out_features, r, generator=generator) * LORA_B_INIT_STD
    return {f"{key}.lora_A.weight": lora_A, f"{key}.lora_B.weight": lora_B}
