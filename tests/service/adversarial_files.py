"""Broken and hostile base models and adapters, written next to the tiny ones of a data directory.

`build_case(case, data_dir)` copies base/tiny-llama or adapters/tiny-furina under the
case's name, damages the copy, and returns the entry names to merge and a fragment
of the error that a merge must report. Hand-written safetensors headers (an 8-byte
little-endian length, then JSON) cover what `save_file` refuses to write.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from furina.checkpoint import checkpoint_fingerprint
from furina.synthetic import write_random_llama

TINY_BASE = "tiny-llama"
TINY_ADAPTER = "tiny-furina"
BASE_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
Q_PROJ = "model.layers.0.self_attn.q_proj"
# A tensor shape whose float32 data would take 3 GiB: [E=3, r=2, d_in=2**27].
HUGE_A_SHAPE = [3, 2, 2**27]
HUGE_BYTES = 3 * 2 * 2**27 * 4


@dataclass(frozen=True)
class BadInput:
    """Entry names to merge and a fragment of the error the merge must report."""

    base: str
    adapter: str
    reason: str


# Writers of damaged entries


def copy_base(data_dir: Path, name: str) -> Path:
    return Path(shutil.copytree(data_dir / "base" / TINY_BASE, data_dir / "base" / name))


def copy_adapter(data_dir: Path, name: str) -> Path:
    source = data_dir / "adapters" / TINY_ADAPTER
    return Path(shutil.copytree(source, data_dir / "adapters" / name))


def edit_adapter_tensors(
    adapter_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]
) -> None:
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS, metadata={"format": "furina"})


def edit_adapter_config(adapter_dir: Path, **changes: object) -> None:
    path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_base_tensors(
    data_dir: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]
) -> Path:
    """Copy the tiny base under name, edit its tensors, and give the adapter its fingerprint.

    Returns the adapter directory: a copy of the tiny adapter that records the edited
    base's fingerprint, so the merge gets past the fingerprint check to the damage.
    """
    base_dir = copy_base(data_dir, name)
    tensors = load_file(base_dir / BASE_WEIGHTS)
    edit(tensors)
    save_file(tensors, base_dir / BASE_WEIGHTS, metadata={"format": "pt"})
    adapter_dir = copy_adapter(data_dir, name)
    edit_adapter_config(adapter_dir, base_model_fingerprint=checkpoint_fingerprint(base_dir))
    return adapter_dir


@dataclass(frozen=True)
class RawTensor:
    """One tensor of a hand-written safetensors file: dtype name, shape and data bytes."""

    name: str
    dtype: str
    shape: list[int]
    data: bytes
    # Bytes the header claims beyond len(data); the file gets a hole of that size.
    hole: int = 0


def read_raw_tensors(path: Path) -> list[RawTensor]:
    with safe_open(path, framework="pt") as handle:
        return [
            RawTensor(name, "F32", list(tensor.shape), tensor.contiguous().numpy().tobytes())
            for name, tensor in ((name, handle.get_tensor(name)) for name in handle.keys())
        ]


def write_raw_safetensors(path: Path, tensors: list[RawTensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file by hand: header length (u64 little-endian), JSON, data.

    Only the last tensor may have a hole, because data offsets must be contiguous.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        end = offset + len(tensor.data) + tensor.hole
        header[tensor.name] = {
            "dtype": tensor.dtype, "shape": tensor.shape, "data_offsets": [offset, end]
        }
        offset = end
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors:
            handle.write(tensor.data)
    os.truncate(path, 8 + len(encoded) + offset)  # the hole takes no disk blocks


def truncate_to_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# Cases: each writes its entries into data_dir and returns what to merge


def truncated_base(data_dir: Path) -> BadInput:
    truncate_to_half(copy_base(data_dir, "truncated-base") / BASE_WEIGHTS)
    return BadInput("truncated-base", TINY_ADAPTER, "cannot read safetensors file")


def truncated_adapter(data_dir: Path) -> BadInput:
    truncate_to_half(copy_adapter(data_dir, "truncated-adapter") / ADAPTER_WEIGHTS)
    return BadInput(TINY_BASE, "truncated-adapter", "truncated or not a safetensors file")


def huge_header_length(data_dir: Path) -> BadInput:
    # The length prefix claims a 1 TiB header; the file is 10 bytes long.
    path = copy_base(data_dir, "huge-header") / BASE_WEIGHTS
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return BadInput("huge-header", TINY_ADAPTER, "header too large")


def huge_tensor_claim(data_dir: Path) -> BadInput:
    # A 16 GiB tensor in the header of a 100-byte file.
    path = copy_base(data_dir, "huge-claim") / BASE_WEIGHTS
    size = 65536 * 65536 * 4
    claim = {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, size]}
    header = {"model.norm.weight": claim}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 16)
    return BadInput("huge-claim", TINY_ADAPTER, "cannot read safetensors file")


def huge_sparse_adapter_tensor(data_dir: Path) -> BadInput:
    """An adapter whose furina_A claims 3 GiB and whose file really has that size (sparse).

    safetensors accepts the header, so only a shape check before reading the data
    keeps the merge from loading 3 GiB.
    """
    path = copy_adapter(data_dir, "huge-tensor") / ADAPTER_WEIGHTS
    huge_name = f"{Q_PROJ}.furina_A"
    tensors = [tensor for tensor in read_raw_tensors(path) if tensor.name != huge_name]
    tensors.append(RawTensor(huge_name, "F32", HUGE_A_SHAPE, b"", hole=HUGE_BYTES))
    write_raw_safetensors(path, tensors, {"format": "furina"})
    return BadInput(TINY_BASE, "huge-tensor", f"has shape {HUGE_A_SHAPE}")


def base_fp6_tensor(data_dir: Path) -> BadInput:
    """A base with an extra F6_E2M3 tensor: safetensors reads its header, torch lacks the dtype."""
    base_dir = copy_base(data_dir, "fp6-base")
    path = base_dir / BASE_WEIGHTS
    tensors = read_raw_tensors(path) + [RawTensor("model.scales", "F6_E2M3", [4], b"\0" * 3)]
    write_raw_safetensors(path, tensors, {"format": "pt"})
    return BadInput("fp6-base", TINY_ADAPTER, "cannot read tensor model.scales")


def adapter_float16(data_dir: Path) -> BadInput:
    def to_half(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.furina_A"] = tensors[f"{Q_PROJ}.furina_A"].half()

    edit_adapter_tensors(copy_adapter(data_dir, "float16-adapter"), to_half)
    return BadInput(TINY_BASE, "float16-adapter", "has dtype torch.float16, expected torch.float32")


def base_int32_weight(data_dir: Path) -> BadInput:
    def to_int(tensors: dict[str, torch.Tensor]) -> None:
        name = f"{Q_PROJ}.weight"
        tensors[name] = (tensors[name] * 1000).to(torch.int32)

    edit_base_tensors(data_dir, "int32-base", to_int)
    return BadInput("int32-base", "int32-base", "only float weights can be merged")


def adapter_nan(data_dir: Path) -> BadInput:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.furina_B"][1, 0, 0] = float("nan")

    edit_adapter_tensors(copy_adapter(data_dir, "nan-adapter"), poison)
    return BadInput(TINY_BASE, "nan-adapter", f"tensor {Q_PROJ}.furina_B contains non-finite")


def adapter_inf(data_dir: Path) -> BadInput:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.furina_magnitude"][3] = float("inf")

    edit_adapter_tensors(copy_adapter(data_dir, "inf-adapter"), poison)
    return BadInput(TINY_BASE, "inf-adapter", f"{Q_PROJ}.furina_magnitude contains non-finite")


def base_nan(data_dir: Path) -> BadInput:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.weight"][2, 5] = float("nan")

    edit_base_tensors(data_dir, "nan-base", poison)
    return BadInput("nan-base", "nan-base", f"base weight {Q_PROJ}.weight contains non-finite")


def adapter_missing_tensor(data_dir: Path) -> BadInput:
    def drop(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[f"{Q_PROJ}.furina_B"]

    edit_adapter_tensors(copy_adapter(data_dir, "missing-tensor"), drop)
    return BadInput(TINY_BASE, "missing-tensor", f"missing tensor {Q_PROJ}.furina_B")


def adapter_missing_module(data_dir: Path) -> BadInput:
    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for key in [key for key in tensors if key.startswith(f"{Q_PROJ}.")]:
            del tensors[key]

    edit_adapter_tensors(copy_adapter(data_dir, "missing-module"), drop)
    return BadInput(TINY_BASE, "missing-module", "adapter has no tensors for 1 base modules")


def base_missing_tensor(data_dir: Path) -> BadInput:
    def drop(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["model.layers.1.mlp.down_proj.weight"]

    edit_base_tensors(data_dir, "missing-weight", drop)
    reason = "has no weight model.layers.1.mlp.down_proj.weight in the base checkpoint"
    return BadInput("missing-weight", "missing-weight", reason)


def adapter_extra_tensor(data_dir: Path) -> BadInput:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.lora_A"] = torch.zeros(2, 64)

    edit_adapter_tensors(copy_adapter(data_dir, "extra-tensor"), add)
    return BadInput(TINY_BASE, "extra-tensor", f"unexpected tensor '{Q_PROJ}.lora_A'")


def adapter_extra_module(data_dir: Path) -> BadInput:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        for name in ("furina_A", "furina_B", "furina_magnitude"):
            tensors[f"model.layers.5.self_attn.q_proj.{name}"] = tensors[f"{Q_PROJ}.{name}"].clone()

    edit_adapter_tensors(copy_adapter(data_dir, "extra-module"), add)
    reason = "model.layers.5.self_attn.q_proj is not a Linear layer of the base model"
    return BadInput(TINY_BASE, "extra-module", reason)


def adapter_from_other_model(data_dir: Path) -> BadInput:
    """An adapter of a narrower model (hidden size 32) that records the tiny base's fingerprint."""
    from service_support import write_tiny_adapter

    other_base = write_random_llama(data_dir / "other-shapes-base", hidden_size=32)
    adapter_dir = write_tiny_adapter(other_base, data_dir / "adapters" / "other-shapes")
    shutil.rmtree(other_base)
    fingerprint = checkpoint_fingerprint(data_dir / "base" / TINY_BASE)
    edit_adapter_config(adapter_dir, base_model_fingerprint=fingerprint)
    return BadInput(TINY_BASE, "other-shapes", "has shape")


def adapter_config_unknown_field(data_dir: Path) -> BadInput:
    edit_adapter_config(copy_adapter(data_dir, "unknown-field"), router_temperature=0.5)
    return BadInput(TINY_BASE, "unknown-field", "invalid field 'router_temperature'")


def adapter_config_future_version(data_dir: Path) -> BadInput:
    edit_adapter_config(copy_adapter(data_dir, "future-version"), format_version=2)
    return BadInput(TINY_BASE, "future-version", "unsupported format_version 2")


def base_without_config(data_dir: Path) -> BadInput:
    (copy_base(data_dir, "no-config") / "config.json").unlink()
    return BadInput("no-config", TINY_ADAPTER, "missing config.json")


def base_other_weights(data_dir: Path) -> BadInput:
    write_random_llama(data_dir / "base" / "other-weights", seed=1)
    return BadInput("other-weights", TINY_ADAPTER, "fingerprint")


CASES: dict[str, Callable[[Path], BadInput]] = {
    "truncated_base": truncated_base,
    "truncated_adapter": truncated_adapter,
    "huge_header_length": huge_header_length,
    "huge_tensor_claim": huge_tensor_claim,
    "huge_sparse_adapter_tensor": huge_sparse_adapter_tensor,
    "base_fp6_tensor": base_fp6_tensor,
    "adapter_float16": adapter_float16,
    "base_int32_weight": base_int32_weight,
    "adapter_nan": adapter_nan,
    "adapter_inf": adapter_inf,
    "base_nan": base_nan,
    "adapter_missing_tensor": adapter_missing_tensor,
    "adapter_missing_module": adapter_missing_module,
    "base_missing_tensor": base_missing_tensor,
    "adapter_extra_tensor": adapter_extra_tensor,
    "adapter_extra_module": adapter_extra_module,
    "adapter_from_other_model": adapter_from_other_model,
    "adapter_config_unknown_field": adapter_config_unknown_field,
    "adapter_config_future_version": adapter_config_future_version,
    "base_without_config": base_without_config,
    "base_other_weights": base_other_weights,
}


def build_case(case: str, data_dir: Path) -> BadInput:
    """Write the entries of one case into data_dir and return what to merge."""
    return CASES[case](data_dir)
