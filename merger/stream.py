"""Read and write safetensors files one tensor at a time.

safetensors' own `save_file` needs every tensor of a file in memory at once. The
`ShardWriter` here writes the header first (all names, dtypes and shapes are known
before the merge starts) and then each tensor's bytes as soon as it is computed. So a
merge allocates one output tensor at a time instead of a whole shard, although pages
of the memory-mapped input file still count towards its resident memory.

The file layout is the one the safetensors format defines: an 8-byte little-endian
header length, a JSON header padded with spaces to a multiple of 8 bytes, then the
tensors back to back with no gaps. Tensors are ordered by element size, largest first,
then by name, so every tensor stays aligned to its element size. safetensors 0.8 also
sorts by dtype first, but orders equal-size dtypes (BF16, F16) differently.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

# torch dtype -> safetensors dtype name, for the dtypes a causal LM checkpoint contains.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    """Map a safetensors dtype name ("F32", "BF16", ...) to the torch dtype."""
    if safetensors_dtype not in TORCH_DTYPES:
        raise ValueError(
            f"unsupported safetensors dtype {safetensors_dtype!r}: supported are "
            f"{sorted(TORCH_DTYPES)}"
        )
    return TORCH_DTYPES[safetensors_dtype]


def file_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Sort tensors the way safetensors lays them out: element size descending, then name."""
    return sorted(specs, key=lambda spec: (-spec.dtype.itemsize, spec.name))


def read_metadata(path: Path) -> dict[str, str]:
    """Return the `__metadata__` map of a safetensors file ({} when it has none)."""
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def iter_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one safetensors file, loading one tensor at a time."""
    with safe_open(path, framework="pt") as handle:
        for name in names:
            yield name, handle.get_tensor(name)


class ShardWriter:
    """Write one safetensors file tensor by tensor, in the order of `file_order(specs)`.

    `write` checks each tensor's name, dtype and shape against the header; `close`
    checks that every tensor was written, then flushes and fsyncs the file.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
        self.path = path
        self._pending = file_order(specs)
        self._position = 0
        self._file: BinaryIO = open(path, "wb")  # closed by close() or abort()
        self._write_header(metadata)

    @property
    def order(self) -> list[str]:
        """Names in the order `write` expects them."""
        return [spec.name for spec in self._pending]

    def _write_header(self, metadata: dict[str, str]) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for spec in self._pending:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes

        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self._pending):
            raise ValueError(f"tensor {name} is not in the header of {self.path}")
        spec = self._pending[self._position]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name} next in {self.path}, got {name}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, but the header of "
                f"{self.path} declares {spec.dtype} {list(spec.shape)}"
            )

        # A uint8 view of the tensor's own storage: numpy exposes it as a buffer, no copy.
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(raw.numpy()))
        self._position += 1

    def close(self) -> None:
        if self._position != len(self._pending):
            missing = [spec.name for spec in self._pending[self._position :]]
            self._file.close()
            raise ValueError(
                f"{len(missing)} tensors were not written to {self.path}: {missing[:3]}"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        logger.debug("wrote %s (%d tensors)", self.path, len(self._pending))

    def abort(self) -> None:
        """Close the file without the completeness check (the caller removes it)."""
        self._file.close()
