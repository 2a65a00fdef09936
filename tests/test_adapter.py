"""Adapter files: bit-exact round trip, every validation rule, atomic save, base fingerprint."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import furina.adapter
from furina.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    FurinaAdapterConfig,
    load_adapter,
    save_adapter,
)
from furina.checkpoint import checkpoint_fingerprint, load_causal_lm
from furina.inject import adapter_state_dict, furina_layers, inject_furina
from furina.layer import FurinaHyperparameters
from furina.synthetic import random_llama, write_random_llama

TINY_LLAMA = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2
)
HPARAMS = FurinaHyperparameters(r=4, lora_alpha=8.0, num_experts=3, num_shared_experts=1, top_k=1)
TARGETS = ["q_proj", "v_proj"]
Q_PROJ = "model.layers.0.self_attn.q_proj"


@dataclass
class TinyAdapter:
    config: FurinaAdapterConfig
    tensors: dict[str, torch.Tensor]
    linear_shapes: dict[str, tuple[int, int]]


@pytest.fixture
def tiny_adapter() -> TinyAdapter:
    model = random_llama(**TINY_LLAMA)
    linear_shapes = {
        path: (module.out_features, module.in_features)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    torch.manual_seed(0)
    inject_furina(model, HPARAMS, target_modules=TARGETS)
    for _, layer in furina_layers(model):
        with torch.no_grad():
            layer.furina_B.normal_()
            layer.furina_magnitude.normal_()
    config = FurinaAdapterConfig(
        base_model_name_or_path="tiny-llama",
        base_model_fingerprint="sha256:0123",
        r=HPARAMS.r,
        lora_alpha=HPARAMS.lora_alpha,
        num_experts=HPARAMS.num_experts,
        num_shared_experts=HPARAMS.num_shared_experts,
        top_k=HPARAMS.top_k,
        eps=HPARAMS.eps,
        target_modules=TARGETS,
        selection_loss_weight=0.01,
    )
    return TinyAdapter(config, adapter_state_dict(model), linear_shapes)


def write_raw(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter files without save_adapter's checks, as a foreign tool might."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, directory / WEIGHTS_FILE)
    return directory


def test_round_trip_bit_exact(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    save_adapter(tmp_path / "adapter", tiny_adapter.config, tiny_adapter.tensors)

    loaded = load_adapter(tmp_path / "adapter", linear_shapes=tiny_adapter.linear_shapes)

    assert loaded.config == tiny_adapter.config
    assert loaded.tensors.keys() == tiny_adapter.tensors.keys()
    for key, tensor in tiny_adapter.tensors.items():
        assert loaded.tensors[key].dtype == torch.float32, key
        assert torch.equal(loaded.tensors[key], tensor), key
    assert len(loaded.module_paths()) == 2 * len(TARGETS)


def test_round_trip_config_json(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    save_adapter(tmp_path / "adapter", tiny_adapter.config, tiny_adapter.tensors)

    written = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())

    assert written["format"] == "furina"
    assert written["format_version"] == 1
    assert written["target_modules"] == TARGETS
    assert written["num_experts"] == HPARAMS.num_experts


def test_module_tensors_order(tiny_adapter: TinyAdapter, tmp_path: Path) -> None:
    save_adapter(tmp_path / "adapter", tiny_adapter.config, tiny_adapter.tensors)

    lora_A, lora_B, magnitude = load_adapter(tmp_path / "adapter").module_tensors(Q_PROJ)

    assert torch.equal(lora_A, tiny_adapter.tensors[f"{Q_PROJ}.furina_A"])
    assert torch.equal(lora_B, tiny_adapter.tensors[f"{Q_PROJ}.furina_B"])
    assert torch.equal(magnitude, tiny_adapter.tensors[f"{Q_PROJ}.furina_magnitude"])


# Each case edits the config dict, the tensors and linear_shapes in place, and gives
# the text that the error message must contain: the offending tensor or field.
Edit = Callable[[dict, dict, dict], None]


def _set_tensor(key: str, value: torch.Tensor) -> Edit:
    def edit(config: dict, tensors: dict, shapes: dict) -> None:
        tensors[key] = value

    return edit


def _delete_tensor(key: str) -> Edit:
    def edit(config: dict, tensors: dict, shapes: dict) -> None:
        del tensors[key]

    return edit


def _poison(key: str, value: float) -> Edit:
    def edit(config: dict, tensors: dict, shapes: dict) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0, 0] = value

    return edit


def _set_config(field: str, value) -> Edit:
    def edit(config: dict, tensors: dict, shapes: dict) -> None:
        config[field] = value

    return edit


def _half_precision(config: dict, tensors: dict, shapes: dict) -> None:
    tensors[f"{Q_PROJ}.furina_A"] = tensors[f"{Q_PROJ}.furina_A"].half()


def _wider_magnitude(config: dict, tensors: dict, shapes: dict) -> None:
    tensors[f"{Q_PROJ}.furina_magnitude"] = torch.zeros(33)


def _base_layer_wider(config: dict, tensors: dict, shapes: dict) -> None:
    shapes[Q_PROJ] = (40, 32)


def _module_not_in_base(config: dict, tensors: dict, shapes: dict) -> None:
    del shapes[Q_PROJ]


def _drop_field(config: dict, tensors: dict, shapes: dict) -> None:
    del config["base_model_fingerprint"]


def _narrow_targets(config: dict, tensors: dict, shapes: dict) -> None:
    config["target_modules"] = ["q_proj"]


def _no_tensors(config: dict, tensors: dict, shapes: dict) -> None:
    tensors.clear()


VALIDATION_CASES = [
    pytest.param(_delete_tensor(f"{Q_PROJ}.furina_B"), f"{Q_PROJ}.furina_B", id="missing-tensor"),
    pytest.param(
        _set_tensor(f"{Q_PROJ}.lora_A", torch.zeros(4, 32)), f"{Q_PROJ}.lora_A", id="unknown-tensor"
    ),
    pytest.param(_set_tensor("furina_A", torch.zeros(3, 4, 32)), "'furina_A'", id="bare-name"),
    pytest.param(_half_precision, f"{Q_PROJ}.furina_A has dtype torch.float16", id="float16"),
    pytest.param(_set_config("r", 5), f"{Q_PROJ}.furina_A has shape", id="rank-vs-config"),
    pytest.param(
        _set_config("num_experts", 4), f"{Q_PROJ}.furina_A has shape", id="experts-vs-config"
    ),
    pytest.param(_wider_magnitude, f"{Q_PROJ}.furina_magnitude has shape", id="magnitude-shape"),
    pytest.param(_set_tensor(f"{Q_PROJ}.furina_A", torch.zeros(4, 32)), Q_PROJ, id="2d-lora-A"),
    pytest.param(_base_layer_wider, f"{Q_PROJ}.furina_B has shape", id="shape-vs-base"),
    pytest.param(_module_not_in_base, f"{Q_PROJ} is not a Linear layer", id="not-in-base"),
    pytest.param(_poison(f"{Q_PROJ}.furina_B", float("nan")), f"{Q_PROJ}.furina_B", id="nan"),
    pytest.param(_poison(f"{Q_PROJ}.furina_A", float("inf")), f"{Q_PROJ}.furina_A", id="inf"),
    pytest.param(_set_config("format_version", 2), "format_version", id="format-version"),
    pytest.param(_set_config("dropout", 0.1), "dropout", id="unknown-field"),
    pytest.param(_set_config("format", "peft"), "format 'peft'", id="wrong-format"),
    pytest.param(_drop_field, "base_model_fingerprint", id="missing-field"),
    pytest.param(_set_config("r", 0), "'r'", id="rank-zero"),
    pytest.param(_set_config("num_shared_experts", 4), "num_shared_experts", id="shared-gt-total"),
    pytest.param(_set_config("top_k", 3), "top_k", id="top-k-gt-routed"),
    pytest.param(_narrow_targets, "model.layers.0.self_attn.v_proj", id="target-modules"),
    pytest.param(_no_tensors, "no tensors", id="empty-file"),
]


@pytest.mark.parametrize(("edit", "named"), VALIDATION_CASES)
def test_validation_error_names_culprit(
    tmp_path: Path, tiny_adapter: TinyAdapter, edit: Edit, named: str
) -> None:
    config = tiny_adapter.config.model_dump()
    tensors = dict(tiny_adapter.tensors)
    shapes = dict(tiny_adapter.linear_shapes)
    edit(config, tensors, shapes)
    write_raw(tmp_path / "adapter", config, tensors)

    with pytest.raises(AdapterError) as raised:
        load_adapter(tmp_path / "adapter", linear_shapes=shapes)

    assert named in str(raised.value)


def test_unedited_raw_adapter_loads(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    # The control for the table above: write_raw itself produces a valid adapter.
    write_raw(tmp_path / "adapter", tiny_adapter.config.model_dump(), tiny_adapter.tensors)

    loaded = load_adapter(tmp_path / "adapter", linear_shapes=tiny_adapter.linear_shapes)

    assert loaded.config == tiny_adapter.config


def test_invalid_json(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    write_raw(tmp_path / "adapter", {}, tiny_adapter.tensors)
    (tmp_path / "adapter" / CONFIG_FILE).write_text('{"format": "furina", ')

    with pytest.raises(AdapterError, match="invalid JSON"):
        load_adapter(tmp_path / "adapter")


def test_json_array_config(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    write_raw(tmp_path / "adapter", {}, tiny_adapter.tensors)
    (tmp_path / "adapter" / CONFIG_FILE).write_text("[1, 2]")

    with pytest.raises(AdapterError, match="JSON object"):
        load_adapter(tmp_path / "adapter")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_adapter(tmp_path / "absent")


def test_missing_config_file(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    write_raw(tmp_path / "adapter", {}, tiny_adapter.tensors)
    (tmp_path / "adapter" / CONFIG_FILE).unlink()

    with pytest.raises(AdapterError, match=CONFIG_FILE):
        load_adapter(tmp_path / "adapter")


def test_missing_weights_file(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    write_raw(tmp_path / "adapter", tiny_adapter.config.model_dump(), tiny_adapter.tensors)
    (tmp_path / "adapter" / WEIGHTS_FILE).unlink()

    with pytest.raises(AdapterError, match=f"missing {WEIGHTS_FILE}"):
        load_adapter(tmp_path / "adapter")


def test_truncated_weights_file(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    write_raw(tmp_path / "adapter", tiny_adapter.config.model_dump(), tiny_adapter.tensors)
    weights = tmp_path / "adapter" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])

    with pytest.raises(AdapterError, match="cannot read .*adapter_model.safetensors"):
        load_adapter(tmp_path / "adapter")


def test_save_rejects_existing_dir(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(output, tiny_adapter.config, tiny_adapter.tensors)

    assert sorted(path.name for path in output.iterdir()) == ["notes.txt"]


def test_save_overwrite_replaces_dir(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "notes.txt").write_text("old")

    save_adapter(output, tiny_adapter.config, tiny_adapter.tensors, overwrite=True)

    assert sorted(path.name for path in output.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_failed_save_leaves_nothing(
    tmp_path: Path, tiny_adapter: TinyAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_save_file(*args, **kwargs) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(furina.adapter, "save_file", failing_save_file)

    with pytest.raises(OSError, match="No space left"):
        save_adapter(tmp_path / "adapter", tiny_adapter.config, tiny_adapter.tensors)

    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_adapter(
    tmp_path: Path, tiny_adapter: TinyAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = save_adapter(tmp_path / "adapter", tiny_adapter.config, tiny_adapter.tensors)

    def failing_save_file(*args, **kwargs) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(furina.adapter, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(output, tiny_adapter.config, tiny_adapter.tensors, overwrite=True)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    assert load_adapter(output).tensors.keys() == tiny_adapter.tensors.keys()


def test_save_rejects_non_finite(tmp_path: Path, tiny_adapter: TinyAdapter) -> None:
    tensors = dict(tiny_adapter.tensors)
    tensors[f"{Q_PROJ}.furina_magnitude"] = torch.full((32,), float("nan"))

    with pytest.raises(AdapterError, match=f"{Q_PROJ}.furina_magnitude"):
        save_adapter(tmp_path / "adapter", tiny_adapter.config, tensors)

    assert list(tmp_path.iterdir()) == []


# checkpoint_fingerprint


def edit_checkpoint_tensor(checkpoint: Path, name: str) -> None:
    """Add 1 to the first element of one tensor of a single-file checkpoint."""
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_random_llama(tmp_path / "base", **TINY_LLAMA)


def test_fingerprint_changes_with_any_weight(tmp_path: Path, tiny_checkpoint: Path) -> None:
    original = checkpoint_fingerprint(tiny_checkpoint)
    names = sorted(load_file(tiny_checkpoint / "model.safetensors"))

    fingerprints = {original}
    for name in names:
        edited = tmp_path / f"edited-{name}"
        write_random_llama(edited, **TINY_LLAMA)
        edit_checkpoint_tensor(edited, name)
        fingerprints.add(checkpoint_fingerprint(edited))

    assert len(names) > 10
    assert len(fingerprints) == len(names) + 1


def test_fingerprint_changes_with_shape(tmp_path: Path, tiny_checkpoint: Path) -> None:
    wider_options = dict(TINY_LLAMA, intermediate_size=TINY_LLAMA["intermediate_size"] + 16)
    wider = write_random_llama(tmp_path / "wider", **wider_options)

    assert checkpoint_fingerprint(wider) != checkpoint_fingerprint(tiny_checkpoint)


def test_fingerprint_changes_with_dtype(tmp_path: Path, tiny_checkpoint: Path) -> None:
    bfloat16 = write_random_llama(tmp_path / "bf16", dtype=torch.bfloat16, **TINY_LLAMA)

    assert checkpoint_fingerprint(bfloat16) != checkpoint_fingerprint(tiny_checkpoint)


def test_fingerprint_stable_across_resaves(tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = load_causal_lm(tiny_checkpoint)
    model.save_pretrained(tmp_path / "resaved")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")

    expected = checkpoint_fingerprint(tiny_checkpoint)

    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert checkpoint_fingerprint(tmp_path / "resaved") == expected
    assert checkpoint_fingerprint(tmp_path / "sharded") == expected
    assert checkpoint_fingerprint(tiny_checkpoint) == expected
    assert expected.startswith("sha256:")
