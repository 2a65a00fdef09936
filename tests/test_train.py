"""Trainer tests on a tiny random Llama: learning, saved adapter, errors, CLI."""

import json

import pytest
import torch

from furina.adapter import load_adapter
from furina.checkpoint import checkpoint_fingerprint, load_causal_lm, load_tokenizer
from furina.cli import main
from furina.data import Example
from furina.inject import attach_adapter
from furina.synthetic import write_random_llama
from furina.train import IGNORE_INDEX, TrainingConfig, run_training, tokenize_example

TINY_CONFIG = dict(steps=60, batch_size=4, learning_rate=1e-2, warmup_steps=2, r=4, num_experts=4)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    # A wide initialisation gives logits a usable range, so the loss can fall far in few steps.
    return write_random_llama(tmp_path_factory.mktemp("base"), seed=1, initializer_range=0.3)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"echo {word}", "completion": word} for word in ["ab", "cd", "ef", "gh"] * 2]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_tokenize_masks_prompt(tiny_base):
    tokenizer = load_tokenizer(tiny_base)
    example = Example(prompt_messages=[{"role": "user", "content": "hi"}], completion="yo")

    input_ids, labels = tokenize_example(tokenizer, example, max_length=512)

    completion_ids = tokenizer("yo" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    prompt_length = len(input_ids) - len(completion_ids)
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert labels[prompt_length:] == completion_ids
    assert input_ids[prompt_length:] == completion_ids


def test_training_lowers_loss_and_saves(tiny_base, dataset, tmp_path):
    output = tmp_path / "adapter"
    result = run_training(tiny_base, dataset, output, TrainingConfig(**TINY_CONFIG))

    assert len(result.task_losses) == TINY_CONFIG["steps"]
    assert all(value > 0 for value in result.selection_losses)
    first, last = sum(result.task_losses[:3]) / 3, sum(result.task_losses[-3:]) / 3
    assert last < first * 0.8

    adapter = load_adapter(output)
    assert adapter.config.base_model_fingerprint == checkpoint_fingerprint(tiny_base)
    assert adapter.config.num_experts == 4
    log = json.loads((output / "training_log.json").read_text())
    assert len(log["selection_losses"]) == TINY_CONFIG["steps"]

    magnitudes = [t for key, t in adapter.tensors.items() if key.endswith("furina_magnitude")]
    assert any(t.abs().max() > 0 for t in magnitudes)


def test_trained_adapter_changes_logits(tiny_base, dataset, tmp_path):
    output = tmp_path / "adapter"
    run_training(tiny_base, dataset, output, TrainingConfig(**TINY_CONFIG))
    input_ids = torch.tensor([[5, 6, 7, 8]])

    base_logits = load_causal_lm(tiny_base)(input_ids).logits
    tuned_logits = attach_adapter(load_causal_lm(tiny_base), output)(input_ids).logits

    assert not torch.allclose(base_logits, tuned_logits)


def test_training_is_seeded(tiny_base, dataset, tmp_path):
    config = TrainingConfig(**{**TINY_CONFIG, "steps": 3})
    first = run_training(tiny_base, dataset, tmp_path / "one", config)
    second = run_training(tiny_base, dataset, tmp_path / "two", config)

    assert first.task_losses == second.task_losses
    tensors_one = load_adapter(tmp_path / "one").tensors
    tensors_two = load_adapter(tmp_path / "two").tensors
    assert all(torch.equal(tensors_one[key], tensors_two[key]) for key in tensors_one)


def test_existing_output_rejected(tiny_base, dataset, tmp_path):
    output = tmp_path / "adapter"
    output.mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_training(tiny_base, dataset, output, TrainingConfig(**TINY_CONFIG))


def test_cli_bad_line_exits_with_line_number(tiny_base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')

    code = main(
        ["train", "--base", str(tiny_base), "--data", str(data), "--output", str(tmp_path / "out")]
    )

    assert code == 2
    error = capsys.readouterr().err
    assert "bad.jsonl:2" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps"),
        (["--top-k", "9"], "top_k"),
        (["--num-shared-experts", "9"], "num_shared_experts"),
        (["--target-modules", " "], "--target-modules"),
    ],
)
def test_cli_rejects_bad_settings(tiny_base, dataset, tmp_path, capsys, flags, message):
    arguments = [
        "train",
        "--base",
        str(tiny_base),
        "--data",
        str(dataset),
        "--output",
        str(tmp_path / "o"),
    ]

    code = main(arguments + flags)

    assert code == 2
    assert message in capsys.readouterr().err
