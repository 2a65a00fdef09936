"""Merging FURINA adapters into dense checkpoints: values, structure, refusals, atomicity, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from merge_helpers import (
    FAST_VERIFY,
    HPARAMS,
    adapter_config,
    furina_tensors,
    leftover_entries,
    read_json,
    reference_delta,
    write_adapter,
    write_raw_adapter,
)
from safetensors import safe_open
from safetensors.torch import load_file

from furina.adapter import load_adapter
from furina.checkpoint import INDEX_FILE, load_causal_lm, read_weight_map
from furina.cli import main as furina_main
from furina.inject import attach_adapter
from furina.synthetic import write_random_llama
from merger import MergeCancelled, MergeError, VerifySettings, merge
from merger.plan import REPORT_FILE

PROMPT_IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base: Path) -> Path:
    return write_adapter(tiny_base, tiny_base.parent / "adapter")


@pytest.fixture(scope="module")
def merged_dir(tiny_base: Path, tiny_adapter: Path) -> Path:
    output = tiny_base.parent / "merged"
    merge(tiny_base, tiny_adapter, output, verify=False)
    return output


def read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def logits(model: torch.nn.Module, input_ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits.double()


# Fold values


def test_fold_matches_float64_reference(tiny_base: Path, tiny_adapter: Path, merged_dir: Path):
    base = read_tensors(tiny_base)
    merged = read_tensors(merged_dir)
    adapter = load_adapter(tiny_adapter)

    assert set(merged) == set(base)
    for path in adapter.module_paths():
        name = f"{path}.weight"
        expected = base[name].double() + reference_delta(*adapter.module_tensors(path), HPARAMS)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6)
        assert (merged[name] - base[name]).abs().max() > 1e-3, f"{name} was not changed"


def test_untargeted_tensors_copied_exactly(tiny_base: Path, tiny_adapter: Path, merged_dir: Path):
    base = read_tensors(tiny_base)
    merged = read_tensors(merged_dir)
    targeted = {f"{path}.weight" for path in load_adapter(tiny_adapter).module_paths()}

    untouched = set(base) - targeted
    assert "model.embed_tokens.weight" in untouched
    for name in untouched:
        assert torch.equal(merged[name], base[name]), name


def test_merged_logits_match_unmerged(tiny_base: Path, tiny_adapter: Path, merged_dir: Path):
    merged = logits(load_causal_lm(merged_dir))
    unmerged = logits(attach_adapter(load_causal_lm(tiny_base), tiny_adapter))
    base = logits(load_causal_lm(tiny_base))

    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert (merged - base).abs().max() > 1e-2


# Structure and files


def test_structure_and_files_match_base(tiny_base: Path, merged_dir: Path):
    base_files = {path.name for path in tiny_base.iterdir()}
    merged_files = {path.name for path in merged_dir.iterdir()}
    assert merged_files == base_files | {REPORT_FILE}
    assert read_json(merged_dir / "config.json") == read_json(tiny_base / "config.json")
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (merged_dir / name).read_bytes() == (tiny_base / name).read_bytes()

    base, merged = read_tensors(tiny_base), read_tensors(merged_dir)
    for name, tensor in base.items():
        assert merged[name].shape == tensor.shape, name
        assert merged[name].dtype == tensor.dtype, name


def test_report_structure_section(merged_dir: Path, tiny_base: Path):
    report = read_json(merged_dir / REPORT_FILE)
    structure = report["structure"]

    assert structure["passed"] is True
    assert structure["tensor_count"]["merged"] == len(read_tensors(tiny_base))
    for check in ("tensor_count", "names", "shapes", "dtypes", "parameter_count", "config"):
        assert structure[check]["identical"] is True, check
    assert report["numerical"] is None
    assert report["latency"] is None
    assert report["adapter_config"]["num_experts"] == HPARAMS.num_experts


def test_verified_merge_report(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    report = merge(tiny_base, tiny_adapter, tmp_path / "out", verify_settings=FAST_VERIFY)
    written = read_json(tmp_path / "out" / REPORT_FILE)
    numerical = written["numerical"]

    assert report.numerical == numerical
    assert numerical["within_tolerance"] is True
    assert numerical["max_rel_logit_diff_merged_vs_unmerged"] < 1e-5
    assert numerical["max_abs_logit_diff_merged_vs_base"] > 1e-2
    assert numerical["merged_differs_from_base"] is True
    assert numerical["greedy_identical"] is True
    assert set(written["latency"]["variants"]) == {"base", "merged", "furina_unmerged"}
    assert written["latency"]["variants"]["base"]["ratio_to_reference"]["total_time_s"] == 1.0
    for phase in ("validate", "write", "structure_check", "numerical_check", "latency", "total"):
        assert written["timings_s"][phase] >= 0, phase
    assert written["memory"]["peak_rss_bytes"] > 0
    assert set(written["versions"]) == {"torch", "transformers", "safetensors", "furina-serve"}


def test_sharded_base_keeps_shards(tmp_path: Path):
    base = write_random_llama(tmp_path / "base", max_shard_size="100KB")
    adapter = write_adapter(base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "out", verify_settings=FAST_VERIFY)

    base_shards = sorted(path.name for path in base.glob("*.safetensors"))
    assert len(base_shards) > 1
    assert sorted(path.name for path in (tmp_path / "out").glob("*.safetensors")) == base_shards
    assert read_weight_map(tmp_path / "out") == read_weight_map(base)

    merged = read_tensors(tmp_path / "out")
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in merged.values())
    assert read_json(tmp_path / "out" / INDEX_FILE)["metadata"]["total_size"] == total_size


def test_bfloat16_output_is_float32_fold_cast_once(
    tiny_base: Path, tiny_adapter: Path, merged_dir: Path, tmp_path: Path
):
    report = merge(tiny_base, tiny_adapter, tmp_path / "bf16", dtype="bfloat16", verify=False)
    merged = read_tensors(tmp_path / "bf16")
    float32 = read_tensors(merged_dir)

    assert read_json(tmp_path / "bf16" / "config.json")["dtype"] == "bfloat16"
    assert report.structure["dtypes"]["identical"] is True
    assert "requested torch.bfloat16" in report.structure["dtypes"]["compared_against"]
    assert report.structure["config"]["changed_keys"] == ["dtype"]
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, float32[name].to(torch.bfloat16)), name


def test_bfloat16_output_verifies(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    report = merge(
        tiny_base, tiny_adapter, tmp_path / "bf16", dtype="bfloat16", verify_settings=FAST_VERIFY
    )

    assert report.numerical["within_tolerance"] is True
    assert report.numerical["relative_tolerance"] > 1e-4
    assert report.numerical["merged_differs_from_base"] is True


# Tied embeddings


def test_tied_embeddings_stay_tied(tiny_base: Path, merged_dir: Path):
    with safe_open(merged_dir / "model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    assert read_json(merged_dir / "config.json")["tie_word_embeddings"] is True

    model = load_causal_lm(merged_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_lm_head_target_unties(tiny_base: Path, tmp_path: Path):
    targets = ["q_proj", "lm_head"]
    adapter = write_adapter(tiny_base, tmp_path / "adapter", target_modules=targets)
    report = merge(tiny_base, adapter, tmp_path / "out", verify_settings=FAST_VERIFY)

    base = read_tensors(tiny_base)
    merged = read_tensors(tmp_path / "out")
    embedding = base["model.embed_tokens.weight"]
    delta = reference_delta(*load_adapter(adapter).module_tensors("lm_head"), HPARAMS)
    assert report.untied_weights == {"lm_head.weight": "model.embed_tokens.weight"}
    assert read_json(tmp_path / "out" / "config.json")["tie_word_embeddings"] is False
    assert torch.equal(merged["model.embed_tokens.weight"], embedding)
    torch.testing.assert_close(merged["lm_head.weight"].double(), embedding.double() + delta)
    assert report.structure["names"]["extra"] == ["lm_head.weight"]
    assert report.structure["passed"] is True
    assert report.numerical["within_tolerance"] is True


# Refusals: each raises before or while writing and leaves nothing behind


def _wrong_fingerprint(base: Path, work: Path) -> Path:
    config = adapter_config(base, fingerprint="sha256:" + "0" * 64)
    return write_raw_adapter(work / "adapter", config, furina_tensors(base))


def _module_missing_from_base(base: Path, work: Path) -> Path:
    tensors = furina_tensors(base, ["q_proj"])
    moved = {key.replace("layers.1.", "layers.7."): value for key, value in tensors.items()}
    return write_raw_adapter(work / "adapter", adapter_config(base, ["q_proj"]), moved)


def _shape_mismatch(base: Path, work: Path) -> Path:
    other = write_random_llama(work / "other", hidden_size=32, intermediate_size=64)
    tensors = furina_tensors(other, ["q_proj"])
    config = adapter_config(
        other, ["q_proj"], fingerprint=adapter_config(base).base_model_fingerprint
    )
    return write_raw_adapter(work / "adapter", config, tensors)


def _nan_in_adapter(base: Path, work: Path) -> Path:
    tensors = furina_tensors(base, ["q_proj"])
    tensors["model.layers.0.self_attn.q_proj.furina_A"][0, 0, 0] = float("nan")
    return write_raw_adapter(work / "adapter", adapter_config(base, ["q_proj"]), tensors)


def _overflowing_fold(base: Path, work: Path) -> Path:
    # Rows of the routed update have norm |v| = 1e7: far beyond float16's maximum 65504.
    return write_adapter(base, work / "adapter", ["v_proj"], magnitude=1e7)


REFUSALS: dict[str, tuple[Callable[[Path, Path], Path], dict, str]] = {
    "wrong_fingerprint": (_wrong_fingerprint, {}, "fingerprint"),
    "module_missing": (_module_missing_from_base, {}, "model.layers.7.self_attn.q_proj"),
    "shape_mismatch": (_shape_mismatch, {}, "shape"),
    "nan_in_adapter": (_nan_in_adapter, {}, "non-finite"),
    "overflowing_fold": (_overflowing_fold, {"dtype": "float16"}, "non-finite"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_leaves_nothing(case: str, tiny_base: Path, tmp_path: Path):
    make_adapter, options, message = REFUSALS[case]
    work = tmp_path / "work"
    work.mkdir()
    adapter = make_adapter(tiny_base, work)
    before = {entry.name for entry in work.iterdir()}

    with pytest.raises(MergeError, match=message):
        merge(tiny_base, adapter, work / "out", verify=False, **options)
    assert not (work / "out").exists()
    assert leftover_entries(work, before) == []


def test_existing_output_rejected(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")

    with pytest.raises(MergeError, match="already exists"):
        merge(tiny_base, tiny_adapter, output, verify=False)
    assert [entry.name for entry in output.iterdir()] == ["keep.txt"]
    assert leftover_entries(tmp_path, {"out"}) == []


def test_output_inside_base_rejected(tiny_base: Path, tiny_adapter: Path):
    with pytest.raises(MergeError, match="would replace the base"):
        merge(tiny_base, tiny_adapter, tiny_base, verify=False, overwrite=True)
    assert (tiny_base / "model.safetensors").is_file()


def test_overwrite_replaces_output(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")

    merge(tiny_base, tiny_adapter, output, verify=False, overwrite=True)
    assert not (output / "keep.txt").exists()
    assert (output / "model.safetensors").is_file()
    assert leftover_entries(tmp_path, {"out"}) == []


def test_failed_overwrite_keeps_old_output(tiny_base: Path, tmp_path: Path):
    adapter = _overflowing_fold(tiny_base, tmp_path)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")

    with pytest.raises(MergeError, match="non-finite"):
        merge(tiny_base, adapter, output, dtype="float16", verify=False, overwrite=True)
    assert (output / "keep.txt").read_text() == "old"
    assert leftover_entries(tmp_path, {"out", "adapter"}) == []


# Progress and cancellation


def test_progress_reaches_one(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    calls: list[tuple[float, str]] = []
    report = merge(
        tiny_base,
        tiny_adapter,
        tmp_path / "out",
        verify=False,
        progress=lambda f, m: calls.append((f, m)),
    )

    fractions = [fraction for fraction, _ in calls]
    assert len(calls) == report.tensor_count
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert sum(message.startswith("merged ") for _, message in calls) == len(report.merged_modules)


def test_cancel_leaves_nothing(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    cancel = threading.Event()
    seen: list[float] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(fraction)
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge(tiny_base, tiny_adapter, tmp_path / "out", progress=progress, cancel_event=cancel)
    assert len(seen) == 3
    assert leftover_entries(tmp_path, set()) == []


def test_cancel_during_verification(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    cancel = threading.Event()

    def progress(fraction: float, message: str) -> None:
        if message.startswith("verifying"):
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge(
            tiny_base,
            tiny_adapter,
            tmp_path / "out",
            progress=progress,
            cancel_event=cancel,
            verify_settings=FAST_VERIFY,
        )
    assert leftover_entries(tmp_path, set()) == []


KILLED_MERGE = """
import sys, time
from pathlib import Path
from merger import merge

def progress(fraction, message):
    if fraction > 0.25:
        Path(sys.argv[4]).write_text("writing")
        time.sleep(120)

merge(sys.argv[1], sys.argv[2], sys.argv[3], verify=False, progress=progress)
"""


def test_sigkill_mid_merge_leaves_no_model(tiny_base: Path, tiny_adapter: Path, tmp_path: Path):
    script = tmp_path / "killed_merge.py"
    script.write_text(textwrap.dedent(KILLED_MERGE))
    parent = tmp_path / "models"
    parent.mkdir()
    marker = tmp_path / "marker"
    command = [
        sys.executable,
        str(script),
        str(tiny_base),
        str(tiny_adapter),
        str(parent / "out"),
        str(marker),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (
            process.stderr.read().decode() if process.poll() is not None else "timeout"
        )
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()

    assert not (parent / "out").exists()
    leftovers = leftover_entries(parent, set())
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".out.")
    assert leftovers[0].endswith(".tmp")


# Command line


def run_cli(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()  # drop output of the test's own setup (model loading bars)
    code = furina_main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_merge_writes_model(tiny_base: Path, tiny_adapter: Path, tmp_path: Path, capsys):
    arguments = ["merge", "--base", str(tiny_base), "--adapter", str(tiny_adapter)]
    code, out, _ = run_cli(arguments + ["--output", str(tmp_path / "out"), "--no-verify"], capsys)

    assert code == 0
    assert "merged 14 modules" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert read_json(tmp_path / "out" / REPORT_FILE)["numerical"] is None


def test_cli_merge_verifies_by_default(tiny_base: Path, tiny_adapter: Path, tmp_path: Path, capsys):
    arguments = ["merge", "--base", str(tiny_base), "--adapter", str(tiny_adapter)]
    code, out, _ = run_cli(
        arguments + ["--output", str(tmp_path / "out"), "--dtype", "float32"], capsys
    )

    assert code == 0
    assert "greedy generations identical: True" in out
    assert "latency furina_unmerged" in out
    assert read_json(tmp_path / "out" / REPORT_FILE)["numerical"]["within_tolerance"] is True


def _cli_wrong_fingerprint(base: Path, adapter: Path, work: Path) -> list[str]:
    wrong = _wrong_fingerprint(base, work)
    return ["--base", str(base), "--adapter", str(wrong), "--output", str(work / "out")]


def _cli_missing_base(base: Path, adapter: Path, work: Path) -> list[str]:
    return [
        "--base",
        str(work / "nowhere"),
        "--adapter",
        str(adapter),
        "--output",
        str(work / "out"),
    ]


def _cli_missing_adapter(base: Path, adapter: Path, work: Path) -> list[str]:
    return ["--base", str(base), "--adapter", str(work / "nowhere"), "--output", str(work / "out")]


def _cli_existing_output(base: Path, adapter: Path, work: Path) -> list[str]:
    (work / "taken").mkdir()
    return ["--base", str(base), "--adapter", str(adapter), "--output", str(work / "taken")]


CLI_ERRORS = {
    "wrong_fingerprint": (_cli_wrong_fingerprint, "fingerprint"),
    "missing_base": (_cli_missing_base, "not found"),
    "missing_adapter": (_cli_missing_adapter, "not found"),
    "existing_output": (_cli_existing_output, "already exists"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_merge_error_one_line(
    case: str, tiny_base: Path, tiny_adapter: Path, tmp_path: Path, capsys
):
    make_arguments, message = CLI_ERRORS[case]
    code, out, err = run_cli(
        ["merge", *make_arguments(tiny_base, tiny_adapter, tmp_path), "--no-verify"], capsys
    )

    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("furina merge: error:")
    assert message in err
    assert not (tmp_path / "out").exists()


# Real SmolLM2-135M base


@pytest.mark.real_model
def test_real_smollm2_merge(real_base_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    adapter = write_adapter(real_base_dir, tmp_path / "adapter", magnitude=0.02)
    settings = VerifySettings(
        prompts=("hello world",),
        greedy_new_tokens=2,
        latency_new_tokens=2,
        latency_repeats=1,
        latency_warmup=0,
    )
    report = merge(real_base_dir, adapter, tmp_path / "merged", verify_settings=settings)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    unmerged = attach_adapter(load_causal_lm(real_base_dir), adapter)
    merged_logits, unmerged_logits = logits(merged), logits(unmerged)
    relative = (merged_logits - unmerged_logits).abs().max() / unmerged_logits.abs().max()
    assert relative < 1e-4
    assert report.numerical["max_abs_logit_diff_merged_vs_base"] > 1e-2
    assert report.structure["passed"] is True
