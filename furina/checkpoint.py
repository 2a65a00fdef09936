"""Read Hugging Face safetensors checkpoints lazily: tensor index, fingerprint, model loading."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Leading bytes of each tensor that go into a fingerprint's content hash.
FINGERPRINT_SAMPLE_BYTES = 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as a Hugging Face safetensors model."""


@dataclass(frozen=True)
class TensorInfo:
    """Location of one tensor in a checkpoint, with its dtype and shape from the file header."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def weight_files(checkpoint_dir: str | os.PathLike[str]) -> list[str]:
    """List the checkpoint's safetensors files in shard order (names relative to the dir)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        return sorted(set(read_weight_map(directory).values()))
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}: expected a Hugging Face "
        "safetensors checkpoint (save it with save_pretrained)"
    )


def read_weight_map(checkpoint_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Return the sharded checkpoint index's weight_map: tensor name -> shard file name."""
    index_path = Path(checkpoint_dir) / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"invalid checkpoint index {index_path}: {error}") from error
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise CheckpointError(f"shard name {shard!r} in {index_path} must be a plain file name")
    return weight_map


def read_tensor_index(checkpoint_dir: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Read every tensor's file, dtype and shape from the safetensors headers only."""
    directory = Path(checkpoint_dir)
    index: dict[str, TensorInfo] = {}
    for file_name in weight_files(directory):
        path = directory / file_name
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    tensor_slice = handle.get_slice(name)
                    index[name] = TensorInfo(
                        file=file_name,
                        dtype=str(tensor_slice.get_dtype()),
                        shape=tuple(tensor_slice.get_shape()),
                    )
        except (OSError, RuntimeError, ValueError, SafetensorError) as error:
            # safetensors 0.8's SafetensorError derives from Exception only: a truncated
            # file, or a header longer than the file or than 100 MB, raises it at open.
            raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error
    return index


def linear_weight_shapes(index: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """Map each module path with a 2-D `.weight` to its (d_out, d_in)."""
    shapes = {}
    for name, info in index.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            shapes[name.removesuffix(".weight")] = (info.shape[0], info.shape[1])
    return shapes


def checkpoint_fingerprint(checkpoint_dir: str | os.PathLike[str]) -> str:
    """Fingerprint a checkpoint from its tensor names, shapes, dtypes and sampled content.

    The sample is every tensor's leading rows that fit in FINGERPRINT_SAMPLE_BYTES (at
    least one row). Sampling only a few tensors would miss a fine-tune or a merged adapter
    that changed the projection weights but not the embeddings or norms. Shard layout and
    file names do not count.
    NOTE: a change confined to rows beyond a tensor's sample is not detected.
    """
    directory = Path(checkpoint_dir)
    index = read_tensor_index(directory)
    digest = hashlib.sha256()
    names = sorted(index)
    for name in names:
        info = index[name]
        digest.update(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())

    for name in names:
        digest.update(_tensor_prefix_bytes(directory / index[name].file, name))
    return "sha256:" + digest.hexdigest()


def _tensor_prefix_bytes(path: Path, name: str) -> bytes:
    # A dtype that torch cannot read (F6_E2M3) raises SafetensorError, and a packed
    # one (F4, two values per byte) raises RuntimeError from the reshape.
    try:
        return _read_tensor_prefix(path, name)
    except (RuntimeError, TypeError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"cannot read tensor {name} of {path}: {error}") from error


def _read_tensor_prefix(path: Path, name: str) -> bytes:
    with safe_open(path, framework="pt") as handle:
        tensor_slice = handle.get_slice(name)
        shape = tensor_slice.get_shape()
        if not shape:
            tensor = handle.get_tensor(name)
        else:
            row_bytes = max(1, _element_size(tensor_slice.get_dtype()) * _prod(shape[1:]))
            rows = max(1, min(shape[0], FINGERPRINT_SAMPLE_BYTES // row_bytes))
            tensor = tensor_slice[:rows]
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _element_size(safetensors_dtype: str) -> int:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
    return sizes.get(safetensors_dtype, 1)


def _prod(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def load_causal_lm(
    checkpoint_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Load a local Hugging Face causal LM in eval mode, never contacting a model hub."""
    from transformers import AutoModelForCausalLM

    directory = Path(checkpoint_dir)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"missing config.json in {directory}: not a Hugging Face checkpoint")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.eval()
    return model


def load_tokenizer(checkpoint_dir: str | os.PathLike[str]):
    """Load the tokenizer saved next to a checkpoint, never contacting a model hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(checkpoint_dir), local_files_only=True)
