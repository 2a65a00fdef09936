"""Wrap and unwrap the Linear layers of a Hugging Face causal LM with FURINA layers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from furina.layer import FurinaHyperparameters, FurinaLinear

logger = logging.getLogger(__name__)

# Attention and MLP projections of Llama-family models (Llama, SmolLM2, Mistral, Qwen2).
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def matches_target(module_path: str, target_modules: Iterable[str]) -> bool:
    """Return whether a module path is targeted: its last name component or full path is listed."""
    targets = set(target_modules)
    return module_path in targets or module_path.rsplit(".", 1)[-1] in targets


def inject_furina(
    model: nn.Module,
    hparams: FurinaHyperparameters,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
) -> list[str]:
    """Replace every targeted nn.Linear with a FurinaLinear in place; return their paths.

    Freezes every base parameter, so only FURINA parameters train afterwards.
    """
    targets = tuple(target_modules)
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    wrapped = []
    for path, module in list(model.named_modules()):
        if isinstance(module, FurinaLinear):
            raise ValueError(f"module {path} is already a FurinaLinear: remove_furina first")
        if isinstance(module, nn.Linear) and matches_target(path, targets):
            _set_submodule(model, path, FurinaLinear(module, hparams))
            wrapped.append(path)

    if not wrapped:
        raise ValueError(
            f"no nn.Linear module matches target_modules {list(targets)}; "
            "name the projection layers of this architecture (for example q_proj, v_proj)"
        )
    logger.info("wrapped %d linear layers with FURINA experts", len(wrapped))
    return wrapped


def remove_furina(model: nn.Module) -> nn.Module:
    """Put the original nn.Linear layers back, discarding the FURINA experts."""
    for path, layer in list(furina_layers(model)):
        _set_submodule(model, path, layer.base_layer)
    return model


def furina_layers(model: nn.Module) -> Iterator[tuple[str, FurinaLinear]]:
    """Yield (module path, layer) for every FurinaLinear in the model."""
    for path, module in model.named_modules():
        if isinstance(module, FurinaLinear):
            yield path, module


def set_selection_tracking(model: nn.Module, enabled: bool) -> None:
    """Turn recording of routed-expert activations (for the selection loss) on or off."""
    for _, layer in furina_layers(model):
        layer.track_selection = enabled
        if not enabled:
            layer.routed_activations = None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collect the adapter tensors, keyed `<module path>.furina_{A,B,magnitude}`, float32."""
    tensors = {}
    for path, layer in furina_layers(model):
        for name in ("furina_A", "furina_B", "furina_magnitude"):
            tensor = getattr(layer, name).detach().to(device="cpu", dtype=torch.float32)
            tensors[f"{path}.{name}"] = tensor.contiguous()
    return tensors


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy validated adapter tensors into the model's FURINA layers."""
    layers = dict(furina_layers(model))
    with torch.no_grad():
        for key, tensor in tensors.items():
            path, name = key.rsplit(".", 1)
            getattr(layers[path], name).copy_(tensor)


def attach_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str]) -> nn.Module:
    """Load a FURINA adapter directory onto a base model in place, unmerged, in eval mode.

    Validates the adapter against the model's layer shapes before changing the model.
    """
    from furina.adapter import AdapterError, load_adapter

    linear_shapes = {
        path: (module.out_features, module.in_features)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    adapter = load_adapter(adapter_dir, linear_shapes=linear_shapes)
    wrapped = inject_furina(model, adapter.config.hyperparameters(), adapter.config.target_modules)

    expected = set(adapter.module_paths())
    if set(wrapped) != expected:
        remove_furina(model)
        missing = sorted(set(wrapped) - expected)[:3]
        raise AdapterError(
            f"adapter {adapter_dir} has no tensors for targeted modules {missing}: "
            "the adapter was trained on another architecture or with other target_modules"
        )
    load_adapter_tensors(model, adapter.tensors)
    model.eval()
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child_name, module)
