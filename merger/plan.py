"""Validate a merge's inputs and plan every output file before anything is written.

All checks that need only the base checkpoint's headers, its config and the adapter
run here: the base fingerprint, module names and shapes, finite adapter tensors, the
output path. The plan then lists each output shard with the name, dtype and shape
of every tensor, which is what the streaming writer needs for its headers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from furina.adapter import AdapterError, FurinaAdapter, load_adapter, read_adapter_config
from furina.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    TensorInfo,
    checkpoint_fingerprint,
    read_tensor_index,
    weight_files,
)
from furina.inject import matches_target
from merger.atomic import check_output_dir
from merger.errors import MergeError
from merger.stream import TensorSpec, read_metadata, torch_dtype

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
REPORT_FILE = "merge_report.json"
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight formats that are never copied next to the merged safetensors files: a stale
# unmerged copy of the weights would load instead of, or next to, the merged ones.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# config.json keys that name the checkpoint dtype (transformers 5 writes "dtype",
# older releases "torch_dtype").
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it is read from and whether an adapter module is folded in."""

    name: str
    source: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    module_path: str | None = None

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass
class ShardPlan:
    """One output safetensors file, named like the base file it is read from."""

    file: str
    tensors: list[TensorPlan]
    metadata: dict[str, str]


@dataclass
class MergePlan:
    """Everything a merge writes, decided before the first byte is written."""

    base_dir: Path
    adapter_dir: Path
    output_dir: Path
    adapter: FurinaAdapter
    output_dtype: torch.dtype | None
    shards: list[ShardPlan]
    config: dict
    config_changed_keys: list[str]
    index: dict | None
    untied: dict[str, str] = field(default_factory=dict)
    copied_files: list[str] = field(default_factory=list)

    @property
    def tensor_count(self) -> int:
        return sum(len(shard.tensors) for shard in self.shards)


def parse_output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map "float32", "bfloat16", "float16" (or the torch dtype) to a torch dtype."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[dtype]
    raise MergeError(f"invalid output dtype {dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")


def plan_merge(
    base_dir: Path,
    adapter_dir: Path,
    output_dir: Path,
    dtype: str | torch.dtype | None,
    overwrite: bool,
) -> MergePlan:
    """Validate the inputs and return the plan; raise MergeError on the first problem."""
    output_dtype = parse_output_dtype(dtype)
    check_output_dir(output_dir, overwrite, {"base": base_dir, "adapter": adapter_dir})

    try:
        base_index = read_tensor_index(base_dir)
        config = _read_config(base_dir)
        check_fingerprint(base_dir, adapter_dir)
        model = _meta_model(base_dir, config)
        adapter = load_adapter(adapter_dir, linear_shapes=_linear_shapes(model))
    except (AdapterError, CheckpointError) as error:
        raise MergeError(str(error)) from error

    _check_module_coverage(adapter, model)
    untied = _untied_weights(adapter, base_index, _tied_aliases(model, base_index))
    targets = {f"{path}.weight": path for path in adapter.module_paths()}
    _check_base_weights(adapter, targets, base_index, untied)

    new_config, changed_keys = _output_config(config, output_dtype, untied, base_dir)
    shards = _shard_plans(base_dir, base_index, targets, untied, output_dtype)
    return MergePlan(
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        output_dir=output_dir,
        adapter=adapter,
        output_dtype=output_dtype,
        shards=shards,
        config=new_config,
        config_changed_keys=changed_keys,
        index=_output_index(base_dir, shards),
        untied=untied,
        copied_files=_files_to_copy(base_dir),
    )


def check_fingerprint(base_dir: Path, adapter_dir: Path) -> None:
    """Reject an adapter whose recorded base fingerprint differs from base_dir's."""
    expected = read_adapter_config(adapter_dir).base_model_fingerprint
    actual = checkpoint_fingerprint(base_dir)
    if actual != expected:
        raise MergeError(
            f"base checkpoint {base_dir} has fingerprint {actual}, but adapter {adapter_dir} "
            f"was trained on a base with fingerprint {expected}: merge onto the base the "
            "adapter was trained on"
        )


def _read_config(base_dir: Path) -> dict:
    path = base_dir / CONFIG_FILE
    if not path.is_file():
        raise MergeError(f"missing {CONFIG_FILE} in {base_dir}: not a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeError(f"invalid JSON in {path}: {error}") from error
    if not isinstance(config, dict):
        raise MergeError(f"{path} must contain a JSON object, got {type(config).__name__}")
    return config


def _meta_model(base_dir: Path, config: dict) -> nn.Module:
    """Build the base architecture on the meta device: module names, shapes, ties, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except (OSError, ValueError, KeyError) as error:
        raise MergeError(
            f"cannot build a causal LM from {base_dir / CONFIG_FILE} "
            f"(model_type {config.get('model_type')!r}): {error}"
        ) from error


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        path: (module.out_features, module.in_features)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def _check_module_coverage(adapter: FurinaAdapter, model: nn.Module) -> None:
    """Require adapter tensors for every base Linear that the adapter's target_modules match."""
    linear_paths = list(_linear_shapes(model))
    targets = adapter.config.target_modules
    targeted = {path for path in linear_paths if matches_target(path, targets)}
    missing = sorted(targeted - set(adapter.module_paths()))
    if missing:
        raise MergeError(
            f"adapter has no tensors for {len(missing)} base modules matched by its "
            f"target_modules {targets}, for example {missing[:3]}: the adapter was trained "
            "on another architecture; merge onto the base it was trained on"
        )

    for target in targets:
        if not any(matches_target(path, [target]) for path in linear_paths):
            logger.warning("target module %r matches no Linear layer of the base model", target)


def _tied_aliases(model: nn.Module, base_index: dict[str, TensorInfo]) -> dict[str, str]:
    """Map each parameter name missing from the files to the stored name it is tied to."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)

    aliases = {}
    for names in groups.values():
        stored = [name for name in names if name in base_index]
        for name in names:
            if name not in base_index and stored:
                aliases[name] = stored[0]
    return aliases


def _untied_weights(
    adapter: FurinaAdapter, base_index: dict[str, TensorInfo], aliases: dict[str, str]
) -> dict[str, str]:
    """Return {weight name: tied source} for adapter targets that share a stored tensor."""
    untied = {}
    for path in adapter.module_paths():
        name = f"{path}.weight"
        if name not in base_index and name in aliases:
            untied[name] = aliases[name]
    return untied


def _check_base_weights(
    adapter: FurinaAdapter,
    targets: dict[str, str],
    base_index: dict[str, TensorInfo],
    untied: dict[str, str],
) -> None:
    """Require a stored float weight of the adapter's shape behind every adapter module."""
    for name, path in targets.items():
        source = untied.get(name, name)
        if source not in base_index:
            raise MergeError(
                f"adapter module {path} has no weight {name} in the base checkpoint files: "
                "the checkpoint does not match its config.json; re-save the base model"
            )
        if base_index[source].dtype not in ("F32", "F16", "BF16", "F64"):
            raise MergeError(
                f"base weight {source} has dtype {base_index[source].dtype}: only float "
                "weights can be merged (dequantize a quantized base first)"
            )
        lora_A, _, magnitude = adapter.module_tensors(path)
        expected = (magnitude.shape[0], lora_A.shape[2])  # (d_out, d_in)
        if base_index[source].shape != expected:
            raise MergeError(
                f"base weight {source} has shape {list(base_index[source].shape)}, but the "
                f"adapter module {path} expects {list(expected)}: the checkpoint files do "
                "not match config.json, or the adapter belongs to another base"
            )


def _output_config(
    config: dict, output_dtype: torch.dtype | None, untied: dict[str, str], base_dir: Path
) -> tuple[dict, list[str]]:
    """Return config.json for the output and the keys that differ from the base's."""
    new_config = dict(config)
    changed = []
    if output_dtype is not None:
        dtype_name = str(output_dtype).removeprefix("torch.")
        present = [key for key in CONFIG_DTYPE_KEYS if key in config] or ["dtype"]
        for key in present:
            new_config[key] = dtype_name
            if config.get(key) != dtype_name:
                changed.append(key)

    if untied:
        if config.get("tie_word_embeddings") is not True:
            raise MergeError(
                f"the adapter targets {sorted(untied)}, which the model ties to "
                f"{sorted(set(untied.values()))}, but {base_dir / CONFIG_FILE} has no "
                "tie_word_embeddings: true to switch off; this tie cannot be undone by a merge"
            )
        new_config["tie_word_embeddings"] = False
        changed.append("tie_word_embeddings")
    return new_config, changed


def _shard_plans(
    base_dir: Path,
    base_index: dict[str, TensorInfo],
    targets: dict[str, str],
    untied: dict[str, str],
    output_dtype: torch.dtype | None,
) -> list[ShardPlan]:
    plans = []
    for file in weight_files(base_dir):
        tensors = []
        names = [name for name, info in base_index.items() if info.file == file]
        names += [name for name, source in untied.items() if base_index[source].file == file]
        for name in sorted(names):
            source = untied.get(name, name)
            info = base_index[source]
            dtype = torch_dtype(info.dtype)
            if output_dtype is not None and dtype.is_floating_point:
                dtype = output_dtype
            tensors.append(TensorPlan(name, source, dtype, info.shape, targets.get(name)))
        metadata = read_metadata(base_dir / file) or {"format": "pt"}
        plans.append(ShardPlan(file=file, tensors=tensors, metadata=metadata))
    return plans


def _output_index(base_dir: Path, shards: list[ShardPlan]) -> dict | None:
    """Return the output's model.safetensors.index.json, or None for a single-file base."""
    index_path = base_dir / INDEX_FILE
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(t.spec().nbytes for shard in shards for t in shard.tensors)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(
            _numel(t.shape) for shard in shards for t in shard.tensors
        )
    index["metadata"] = metadata
    index["weight_map"] = {t.name: shard.file for shard in shards for t in shard.tensors}
    return index


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _files_to_copy(base_dir: Path) -> list[str]:
    """List the base's non-weight entries (tokenizer, chat template, generation config, ...)."""
    copied = []
    merged_weight_files = weight_files(base_dir)
    for entry in sorted(base_dir.iterdir()):
        name = entry.name
        if name in (CONFIG_FILE, REPORT_FILE) or name.endswith(".index.json"):
            continue
        if name.endswith(WEIGHT_SUFFIXES):
            if name not in merged_weight_files:
                logger.warning("not copying weight file %s from the base directory", name)
            continue
        copied.append(name)
    return copied
