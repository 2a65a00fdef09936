"""Greedy exact-match evaluation on a tiny random Llama with a byte-level tokenizer."""

import json

import pytest
import torch

from furina.cli import main
from furina.data import Example, render_prompt
from furina.evaluate import evaluate_exact_match, is_exact_match
from furina.synthetic import byte_level_tokenizer, random_llama, write_random_llama

MAX_NEW_TOKENS = 8

# Prompts of different lengths, so a batch needs left padding.
PROMPTS = ["a", "hello there", "2+2?", "a much longer prompt than the others", "xyz"]


@pytest.fixture(scope="module")
def tiny_model():
    # A wide initialisation makes greedy outputs vary between prompts.
    return random_llama(seed=3, initializer_range=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def make_examples(references):
    return [
        Example(prompt_messages=[{"role": "user", "content": prompt}], completion=reference)
        for prompt, reference in zip(PROMPTS, references, strict=True)
    ]


@torch.inference_mode()
def reference_greedy(model, tokenizer, example, max_new_tokens):
    """Decode one unpadded prompt by argmax over full forward passes, without a KV cache."""
    prompt_ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt_ids])
    new_ids = []
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=input_ids).logits[0, -1].argmax())
        if next_id == tokenizer.eos_token_id:
            break
        new_ids.append(next_id)
        input_ids = torch.cat([input_ids, torch.tensor([[next_id]])], dim=1)
    return tokenizer.decode(new_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected_outputs(tiny_model, tokenizer):
    examples = make_examples([""] * len(PROMPTS))
    return [reference_greedy(tiny_model, tokenizer, e, MAX_NEW_TOKENS) for e in examples]


def test_batched_outputs_match_unpadded_reference(tiny_model, tokenizer, expected_outputs):
    examples = make_examples([""] * len(PROMPTS))

    result = evaluate_exact_match(
        tiny_model, tokenizer, examples, MAX_NEW_TOKENS, progress=False, batch_size=3
    )

    predictions = [prediction.prediction for prediction in result.predictions]
    assert predictions == [output.strip() for output in expected_outputs]
    # A test on empty or identical outputs would not exercise padding.
    assert len(set(predictions)) > 1


def test_accuracy_counts_exact_matches(tiny_model, tokenizer, expected_outputs):
    references = list(expected_outputs)
    references[1] = "wrong answer"
    references[3] = expected_outputs[3] + "x"
    references[4] = f"  {expected_outputs[4]}\n"  # whitespace around the answer is ignored
    examples = make_examples(references)

    result = evaluate_exact_match(
        tiny_model, tokenizer, examples, MAX_NEW_TOKENS, progress=False, batch_size=2
    )

    assert result.total == 5
    assert result.correct == 3
    assert result.accuracy == pytest.approx(0.6)
    assert [prediction.correct for prediction in result.predictions] == [
        True,
        False,
        True,
        False,
        True,
    ]


def test_prediction_records_prompt_and_reference(tiny_model, tokenizer):
    examples = make_examples(["r0", "r1", "r2", "r3", "r4"])

    result = evaluate_exact_match(tiny_model, tokenizer, examples, 2, progress=False)

    assert [prediction.prompt for prediction in result.predictions] == PROMPTS
    assert [prediction.reference for prediction in result.predictions] == [
        "r0",
        "r1",
        "r2",
        "r3",
        "r4",
    ]


def test_batch_size_does_not_change_outputs(tiny_model, tokenizer):
    examples = make_examples([""] * len(PROMPTS))

    outputs = []
    for batch_size in (1, 2, 5):
        result = evaluate_exact_match(
            tiny_model, tokenizer, examples, MAX_NEW_TOKENS, progress=False, batch_size=batch_size
        )
        outputs.append([prediction.prediction for prediction in result.predictions])

    assert outputs[0] == outputs[1]
    assert outputs[0] == outputs[2]


def test_tokenizer_padding_side_unchanged(tiny_model, tokenizer):
    padding_side = tokenizer.padding_side

    evaluate_exact_match(tiny_model, tokenizer, make_examples(PROMPTS), 2, progress=False)

    assert tokenizer.padding_side == padding_side


def test_generation_stops_at_max_new_tokens(tiny_model, tokenizer, expected_outputs):
    examples = make_examples([""] * len(PROMPTS))

    result = evaluate_exact_match(tiny_model, tokenizer, examples, 1, progress=False)

    predictions = [prediction.prediction for prediction in result.predictions]
    one_token_outputs = [reference_greedy(tiny_model, tokenizer, e, 1).strip() for e in examples]
    assert predictions == one_token_outputs
    assert predictions != [output.strip() for output in expected_outputs]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("2021-03-05", "2021-03-05", True),
        (" 2021-03-05\n", "2021-03-05", True),
        ("2021-03-05", "\t2021-03-05 ", True),
        ("2021-03-05.", "2021-03-05", False),
        ("2021-3-5", "2021-03-05", False),
        ("", "2021-03-05", False),
    ],
)
def test_is_exact_match(prediction, reference, expected):
    assert is_exact_match(prediction, reference) is expected


def test_empty_examples_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="no examples to evaluate"):
        evaluate_exact_match(tiny_model, tokenizer, [], 4, progress=False)


@pytest.mark.parametrize(("max_new_tokens", "batch_size"), [(0, 4), (4, 0)])
def test_nonpositive_limits_rejected(tiny_model, tokenizer, max_new_tokens, batch_size):
    examples = make_examples(PROMPTS)

    with pytest.raises(ValueError, match="must be at least 1"):
        evaluate_exact_match(
            tiny_model, tokenizer, examples, max_new_tokens, progress=False, batch_size=batch_size
        )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), seed=3, initializer_range=0.3)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    lines = [json.dumps({"prompt": prompt, "completion": "no"}) for prompt in PROMPTS]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_writes_predictions_json(tiny_checkpoint, data_file, tmp_path, capsys):
    output = tmp_path / "result.json"

    exit_code = main(
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(data_file),
            "--max-new-tokens",
            "4",
            "--output",
            str(output),
        ]
    )

    report = json.loads(output.read_text())
    assert exit_code == 0
    assert "exact match: " in capsys.readouterr().out
    assert report["total"] == len(PROMPTS)
    assert report["correct"] == sum(p["correct"] for p in report["predictions"])
    assert report["accuracy"] == report["correct"] / report["total"]
    assert [p["prompt"] for p in report["predictions"]] == PROMPTS
    assert report["adapter"] is None


def test_cli_limit_scores_first_examples(tiny_checkpoint, data_file, tmp_path):
    output = tmp_path / "result.json"

    exit_code = main(
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(data_file),
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--output",
            str(output),
        ]
    )

    report = json.loads(output.read_text())
    assert exit_code == 0
    assert report["total"] == 2
    assert [p["prompt"] for p in report["predictions"]] == PROMPTS[:2]


def test_cli_attaches_adapter(tiny_checkpoint, data_file, tmp_path, monkeypatch):
    calls = []

    def fake_attach_adapter(model, adapter_dir):
        calls.append((type(model).__name__, adapter_dir))
        return model

    monkeypatch.setattr("furina.inject.attach_adapter", fake_attach_adapter)
    adapter_dir = tmp_path / "adapter"

    exit_code = main(
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--adapter",
            str(adapter_dir),
            "--data",
            str(data_file),
            "--max-new-tokens",
            "2",
        ]
    )

    assert exit_code == 0
    assert calls == [("LlamaForCausalLM", adapter_dir)]


def test_cli_rejects_zero_limit(tiny_checkpoint, data_file, capsys):
    exit_code = main(
        ["eval", "--model", str(tiny_checkpoint), "--data", str(data_file), "--limit", "0"]
    )

    assert exit_code == 2
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err


def test_cli_reports_missing_data_file(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "absent.jsonl"

    exit_code = main(["eval", "--model", str(tiny_checkpoint), "--data", str(missing)])

    assert exit_code == 2
    assert f"data file not found: {missing}" in capsys.readouterr().err
