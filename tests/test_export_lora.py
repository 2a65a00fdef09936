"""Exporting FURINA adapters as PEFT LoRA: file format, PEFT round trip, merge parity, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import (
    HPARAMS,
    adapter_config,
    furina_tensors,
    leftover_entries,
    read_json,
    write_adapter,
    write_raw_adapter,
)
from peft import PeftModel
from safetensors.torch import load_file

from furina.adapter import load_adapter
from furina.checkpoint import load_causal_lm
from furina.cli import main as furina_main
from furina.inject import DEFAULT_TARGET_MODULES, attach_adapter
from furina.synthetic import write_random_llama
from merger import MergeError, export_lora, merge

PROMPT_IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
RANK = HPARAMS.num_experts * HPARAMS.r


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base: Path) -> Path:
    return write_adapter(tiny_base, tiny_base.parent / "adapter")


@pytest.fixture(scope="module")
def exported(tiny_adapter: Path) -> Path:
    return export_lora(tiny_adapter, tiny_adapter.parent / "peft")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=PROMPT_IDS).logits.double()


def test_export_config(exported: Path, tiny_base: Path):
    config = read_json(exported / "adapter_config.json")

    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK
    assert config["lora_alpha"] == RANK
    assert config["use_rslora"] is False
    assert config["target_modules"] == list(DEFAULT_TARGET_MODULES)
    assert config["base_model_name_or_path"] == str(tiny_base)


def test_export_keys_and_shapes(exported: Path, tiny_adapter: Path):
    tensors = load_file(exported / "adapter_model.safetensors")
    adapter = load_adapter(tiny_adapter)

    assert len(tensors) == 2 * len(adapter.module_paths())
    for path in adapter.module_paths():
        lora_A, lora_B, _ = adapter.module_tensors(path)
        exported_A = tensors[f"base_model.model.{path}.lora_A.weight"]
        exported_B = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert exported_A.shape == (RANK, lora_A.shape[2])
        assert exported_B.shape == (lora_B.shape[1], RANK)
        assert exported_A.dtype == exported_B.dtype == torch.float32


def test_peft_logits_match_unmerged_furina(exported: Path, tiny_base: Path, tiny_adapter: Path):
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_base), exported).eval()
    furina = attach_adapter(load_causal_lm(tiny_base), tiny_adapter)
    base = load_causal_lm(tiny_base)

    peft_logits = logits(peft_model)
    torch.testing.assert_close(peft_logits, logits(furina), rtol=1e-5, atol=1e-5)
    assert (peft_logits - logits(base)).abs().max() > 1e-2


def test_peft_merge_equals_furina_merge(
    exported: Path, tiny_base: Path, tiny_adapter: Path, tmp_path: Path
):
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_base), exported)
    peft_weights = peft_model.merge_and_unload().state_dict()
    merge(tiny_base, tiny_adapter, tmp_path / "merged", verify=False)
    furina_weights = load_file(tmp_path / "merged" / "model.safetensors")

    base_weights = load_file(tiny_base / "model.safetensors")
    for name, tensor in furina_weights.items():
        torch.testing.assert_close(peft_weights[name], tensor, rtol=1e-6, atol=1e-6)
    changed = [
        name for name in furina_weights if not torch.equal(furina_weights[name], base_weights[name])
    ]
    assert len(changed) == len(load_adapter(tiny_adapter).module_paths())


def test_export_rejects_existing_output(tiny_adapter: Path, tmp_path: Path):
    (tmp_path / "peft").mkdir()

    with pytest.raises(MergeError, match="already exists"):
        export_lora(tiny_adapter, tmp_path / "peft")
    assert list((tmp_path / "peft").iterdir()) == []


def test_export_overwrite(tiny_adapter: Path, tmp_path: Path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "old.txt").write_text("old")

    export_lora(tiny_adapter, tmp_path / "peft", overwrite=True)
    assert sorted(entry.name for entry in (tmp_path / "peft").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert leftover_entries(tmp_path, {"peft"}) == []


def test_export_rejects_nan_adapter(tiny_base: Path, tmp_path: Path):
    tensors = furina_tensors(tiny_base, ["q_proj"])
    tensors["model.layers.0.self_attn.q_proj.furina_magnitude"][3] = float("nan")
    adapter = write_raw_adapter(
        tmp_path / "adapter", adapter_config(tiny_base, ["q_proj"]), tensors
    )

    with pytest.raises(MergeError, match="non-finite"):
        export_lora(adapter, tmp_path / "peft")
    assert leftover_entries(tmp_path, {"adapter"}) == []


def test_cli_export_lora(tiny_adapter: Path, tmp_path: Path, capsys):
    capsys.readouterr()
    code = furina_main(
        ["export-lora", "--adapter", str(tiny_adapter), "--output", str(tmp_path / "peft")]
    )

    assert code == 0
    assert "wrote PEFT LoRA adapter" in capsys.readouterr().out
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_cli_export_lora_missing_adapter(tmp_path: Path, capsys):
    capsys.readouterr()
    arguments = [
        "export-lora",
        "--adapter",
        str(tmp_path / "nowhere"),
        "--output",
        str(tmp_path / "peft"),
    ]
    code = furina_main(arguments)
    err = capsys.readouterr().err

    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("furina export-lora: error: adapter directory not found")
    assert not (tmp_path / "peft").exists()
