"""FURINA adapter files: `adapter_config.json` plus `adapter_model.safetensors`.

Tensors are float32, one set per wrapped module path P (its name in
`model.named_modules()`): `P.furina_A` [E, r, d_in], `P.furina_B` [E, d_out, r] with
experts 0..S-1 shared, and `P.furina_magnitude` [d_out]. docs/adapter-format.md
describes the format; `load_adapter` checks every rule it states.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import safe_open
from safetensors.torch import save_file

from furina.inject import matches_target
from furina.layer import FurinaHyperparameters

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_NAME = "furina"
FORMAT_VERSION = 1
TENSOR_NAMES = ("furina_A", "furina_B", "furina_magnitude")
# safetensors dtype names of a file header that map to a torch dtype, for the header check.
HEADER_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed or does not fit the base model."""


class FurinaAdapterConfig(BaseModel):
    """Contents of adapter_config.json. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["furina"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    base_model_name_or_path: str
    base_model_fingerprint: str
    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    use_rslora: bool = False
    num_experts: int = Field(ge=1)
    num_shared_experts: int = Field(ge=0)
    top_k: int = Field(ge=1)
    eps: float = Field(gt=0)
    target_modules: list[str] = Field(min_length=1)
    selection_loss_weight: float = Field(ge=0)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported format_version {version}: this release reads version "
                f"{FORMAT_VERSION}; upgrade furina-serve or re-export the adapter"
            )
        return version

    def hyperparameters(self) -> FurinaHyperparameters:
        return FurinaHyperparameters(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            num_experts=self.num_experts,
            num_shared_experts=self.num_shared_experts,
            top_k=self.top_k,
            eps=self.eps,
        )


@dataclass
class FurinaAdapter:
    """A loaded, validated adapter: its config and float32 tensors keyed as in the file."""

    config: FurinaAdapterConfig
    tensors: dict[str, torch.Tensor]

    def module_paths(self) -> list[str]:
        return sorted({key.rsplit(".", 1)[0] for key in self.tensors})

    def module_tensors(self, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (furina_A, furina_B, furina_magnitude) of one module path."""
        return tuple(self.tensors[f"{path}.{name}"] for name in TENSOR_NAMES)  # type: ignore[return-value]


def save_adapter(
    output_dir: str | os.PathLike[str],
    config: FurinaAdapterConfig,
    tensors: dict[str, torch.Tensor],
    overwrite: bool = False,
) -> Path:
    """Write an adapter directory atomically: a temporary sibling renamed on success."""
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"adapter output {output} already exists: pass --overwrite to replace it"
        )
    output.parent.mkdir(parents=True, exist_ok=True)

    float_tensors = {
        key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()
    }
    # Reject what load_adapter would reject (NaN, wrong shapes) before anything is written.
    validate_adapter_tensors(config, float_tensors)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        (temporary / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        save_file(float_tensors, temporary / WEIGHTS_FILE, metadata={"format": FORMAT_NAME})
        if output.exists():
            shutil.rmtree(output)
        temporary.rename(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("saved FURINA adapter with %d tensors to %s", len(float_tensors), output)
    return output


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> FurinaAdapterConfig:
    """Read and validate adapter_config.json; errors name the field and the expected value."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not Path(adapter_dir).is_dir():
        raise AdapterError(f"adapter directory not found: {adapter_dir}")
    if not path.is_file():
        raise AdapterError(
            f"missing {CONFIG_FILE} in {adapter_dir}: not a FURINA adapter directory"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"invalid JSON in {path}: {error}") from error
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must contain a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise AdapterError(
            f"{path} has format {raw.get('format')!r}, expected {FORMAT_NAME!r}: "
            "this is not a FURINA adapter (PEFT LoRA adapters are served by PEFT-aware engines)"
        )
    try:
        config = FurinaAdapterConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise AdapterError(f"invalid field {field!r} in {path}: {first['msg']}") from error

    try:
        config.hyperparameters()
    except ValueError as error:
        raise AdapterError(f"inconsistent hyperparameters in {path}: {error}") from error
    return config


def load_adapter(
    adapter_dir: str | os.PathLike[str],
    linear_shapes: dict[str, tuple[int, int]] | None = None,
) -> FurinaAdapter:
    """Load and validate an adapter directory.

    linear_shapes maps the base model's Linear module paths to (d_out, d_in); when
    given, every adapter module must exist there with matching shapes. Without it, the
    shapes need only agree with each other and the config, so they are not bounded.
    """
    config = read_adapter_config(adapter_dir)
    path = Path(adapter_dir) / WEIGHTS_FILE
    # The header alone is checked first, so a tensor whose header claims gigabytes
    # is rejected before its data is read.
    validate_adapter_tensors(config, _read_header(path), linear_shapes, check_values=False)
    tensors = _read_tensors(path)
    validate_adapter_tensors(config, tensors, linear_shapes)
    return FurinaAdapter(config=config, tensors=tensors)


def _read_header(path: Path) -> dict[str, torch.Tensor]:
    """Return each tensor of the file as a meta tensor: its dtype and shape, no data."""
    if not path.is_file():
        raise AdapterError(f"missing {WEIGHTS_FILE} in {path.parent}")
    try:
        dtypes_and_shapes = {}
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                dtypes_and_shapes[key] = (tensor_slice.get_dtype(), tensor_slice.get_shape())
    except Exception as error:  # safetensors raises its own SafetensorError for any bad file
        raise AdapterError(
            f"cannot read {path}: {error} (truncated or not a safetensors file)"
        ) from error

    tensors = {}
    for key, (dtype_name, shape) in dtypes_and_shapes.items():
        dtype = HEADER_DTYPES.get(dtype_name)
        if dtype is None:
            raise AdapterError(f"tensor {key} has dtype {dtype_name}, expected torch.float32")
        tensors[key] = torch.empty(shape, dtype=dtype, device="meta")
    return tensors


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError for any bad file
        raise AdapterError(
            f"cannot read {path}: {error} (truncated or not a safetensors file)"
        ) from error


def validate_adapter_tensors(
    config: FurinaAdapterConfig,
    tensors: dict[str, torch.Tensor],
    linear_shapes: dict[str, tuple[int, int]] | None = None,
    check_values: bool = True,
) -> None:
    """Check names, completeness, dtype, shapes and finiteness of adapter tensors.

    With check_values False the finiteness check is skipped, so the tensors may be
    meta tensors read from a file header.
    """
    modules: dict[str, set[str]] = {}
    for key in tensors:
        path, _, name = key.rpartition(".")
        if name not in TENSOR_NAMES or not path:
            raise AdapterError(
                f"unexpected tensor {key!r}: adapter tensors must be named "
                "<module path>.furina_A, .furina_B or .furina_magnitude"
            )
        modules.setdefault(path, set()).add(name)
    if not modules:
        raise AdapterError("adapter_model.safetensors contains no tensors")

    for path, names in sorted(modules.items()):
        for name in TENSOR_NAMES:
            if name not in names:
                raise AdapterError(
                    f"missing tensor {path}.{name}: each module needs {', '.join(TENSOR_NAMES)}"
                )
        if not matches_target(path, config.target_modules):
            raise AdapterError(
                f"tensors for module {path} do not match target_modules {config.target_modules}"
            )
        _validate_module(config, path, tensors, linear_shapes, check_values)


def _validate_module(
    config: FurinaAdapterConfig,
    path: str,
    tensors: dict[str, torch.Tensor],
    linear_shapes: dict[str, tuple[int, int]] | None,
    check_values: bool,
) -> None:
    lora_A = tensors[f"{path}.furina_A"]
    lora_B = tensors[f"{path}.furina_B"]
    magnitude = tensors[f"{path}.furina_magnitude"]
    for name, tensor in (
        ("furina_A", lora_A),
        ("furina_B", lora_B),
        ("furina_magnitude", magnitude),
    ):
        if tensor.dtype != torch.float32:
            raise AdapterError(
                f"tensor {path}.{name} has dtype {tensor.dtype}, expected torch.float32"
            )

    if lora_A.dim() != 3 or lora_B.dim() != 3 or magnitude.dim() != 1:
        raise AdapterError(
            f"module {path}: expected furina_A [E, r, d_in], furina_B [E, d_out, r], "
            f"furina_magnitude [d_out], got {list(lora_A.shape)}, {list(lora_B.shape)}, "
            f"{list(magnitude.shape)}"
        )
    d_out, d_in = lora_B.shape[1], lora_A.shape[2]
    expected = {
        "furina_A": (config.num_experts, config.r, d_in),
        "furina_B": (config.num_experts, d_out, config.r),
        "furina_magnitude": (d_out,),
    }
    if linear_shapes is not None:
        if path not in linear_shapes:
            raise AdapterError(
                f"adapter module {path} is not a Linear layer of the base model: "
                "use the base model the adapter was trained on"
            )
        base_out, base_in = linear_shapes[path]
        expected["furina_A"] = (config.num_experts, config.r, base_in)
        expected["furina_B"] = (config.num_experts, base_out, config.r)
        expected["furina_magnitude"] = (base_out,)

    for name, tensor in (
        ("furina_A", lora_A),
        ("furina_B", lora_B),
        ("furina_magnitude", magnitude),
    ):
        if tuple(tensor.shape) != expected[name]:
            raise AdapterError(
                f"tensor {path}.{name} has shape {list(tensor.shape)}, expected "
                f"{list(expected[name])} from num_experts={config.num_experts}, "
                f"r={config.r} and the base layer"
            )
        if check_values and not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {path}.{name} contains non-finite values (NaN or Inf)")
