"""prepare-base: output checks on the real SmolLM2 base, and publishing logic on a tiny model."""

import json

import pytest
import torch
from safetensors import safe_open

import furina.base_model as base_model
from furina.base_model import (
    GGUF_INSTALL_COMMAND,
    find_gguf_file,
    has_tied_embeddings,
    load_gguf_base,
    prepare_base,
)
from furina.checkpoint import load_causal_lm, load_tokenizer
from furina.cli import main
from furina.synthetic import byte_level_tokenizer, random_llama

SMOLLM2_CHAT_PROMPT = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "Convert to ISO 8601: March 5, 2021<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.real_model
def test_real_config_is_dense_float32_llama(real_base_dir):
    config = json.loads((real_base_dir / "config.json").read_text())

    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 30


@pytest.mark.real_model
def test_real_weights_store_one_embedding_copy(real_base_dir):
    with safe_open(real_base_dir / "model.safetensors", framework="pt") as handle:
        names = list(handle.keys())
        dtypes = {handle.get_slice(name).get_dtype() for name in names}

    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names
    assert dtypes == {"F32"}


@pytest.mark.real_model
def test_real_generation_config_ids(real_base_dir):
    generation_config = json.loads((real_base_dir / "generation_config.json").read_text())
    tokenizer = load_tokenizer(real_base_dir)

    assert tokenizer.convert_ids_to_tokens(generation_config["bos_token_id"]) == "<|im_start|>"
    assert tokenizer.convert_ids_to_tokens(generation_config["eos_token_id"]) == "<|im_end|>"
    assert generation_config["eos_token_id"] == tokenizer.eos_token_id
    assert generation_config["pad_token_id"] == tokenizer.pad_token_id


@pytest.mark.real_model
def test_real_tied_embeddings_after_reload(real_base_dir):
    model = load_causal_lm(real_base_dir)

    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.real_model
def test_real_chat_template_renders(real_base_dir):
    tokenizer = load_tokenizer(real_base_dir)
    messages = [{"role": "user", "content": "Convert to ISO 8601: March 5, 2021"}]

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert prompt == SMOLLM2_CHAT_PROMPT
    assert tokenizer.model_max_length == 8192


@pytest.fixture(scope="module")
def gguf_base():
    try:
        find_gguf_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load_gguf_base()


@pytest.mark.real_model
def test_real_logits_match_gguf_model(real_base_dir, gguf_base):
    gguf_model, gguf_tokenizer = gguf_base
    model = load_causal_lm(real_base_dir)
    tokenizer = load_tokenizer(real_base_dir)
    texts = [SMOLLM2_CHAT_PROMPT, "The capital of France is"]

    for text in texts:
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gguf_ids = gguf_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            expected = gguf_model(input_ids=gguf_ids).logits
            actual = model(input_ids=input_ids).logits

        assert torch.equal(input_ids, gguf_ids)
        # Same float32 weights through the same code: equal up to summation-order noise.
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def tiny_gguf_stand_in(gguf_path=None):
    """Stand in for load_gguf_base with a tiny random Llama and the byte-level tokenizer."""
    return random_llama(seed=5), byte_level_tokenizer()


@pytest.fixture
def tiny_source(monkeypatch, tmp_path):
    monkeypatch.setattr(base_model, "find_gguf_file", lambda: tmp_path / "stand-in.gguf")
    monkeypatch.setattr(base_model, "load_gguf_base", tiny_gguf_stand_in)


def sibling_names(path):
    return sorted(entry.name for entry in path.parent.iterdir())


def test_prepare_writes_verified_checkpoint(tiny_source, tmp_path):
    output = tmp_path / "base"

    result = prepare_base(output)

    model = load_causal_lm(output)
    assert result == output
    assert has_tied_embeddings(model)
    assert load_tokenizer(output).chat_template
    assert sibling_names(output) == ["base"]


def test_prepare_rejects_existing_output(tiny_source, tmp_path):
    output = tmp_path / "base"
    output.mkdir()

    with pytest.raises(FileExistsError, match="--overwrite") as raised:
        prepare_base(output)

    assert str(output) in str(raised.value)


def test_prepare_overwrite_replaces_output(tiny_source, tmp_path):
    output = tmp_path / "base"
    output.mkdir()
    (output / "stale.txt").write_text("old")

    prepare_base(output, overwrite=True)

    assert not (output / "stale.txt").exists()
    assert (output / "model.safetensors").is_file()
    assert sibling_names(output) == ["base"]


def test_failed_verification_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    def failing_verify(checkpoint_dir, reference_model):
        raise ValueError("reloaded logits differ")

    monkeypatch.setattr(base_model, "verify_checkpoint", failing_verify)
    output = tmp_path / "base"

    with pytest.raises(ValueError, match="reloaded logits differ"):
        prepare_base(output)

    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_output(tiny_source, tmp_path, monkeypatch):
    def failing_verify(checkpoint_dir, reference_model):
        raise ValueError("reloaded logits differ")

    monkeypatch.setattr(base_model, "verify_checkpoint", failing_verify)
    output = tmp_path / "base"
    output.mkdir()
    (output / "keep.txt").write_text("old")

    with pytest.raises(ValueError, match="reloaded logits differ"):
        prepare_base(output, overwrite=True)

    assert (output / "keep.txt").read_text() == "old"
    assert sibling_names(output) == ["base"]


def test_verify_detects_untied_embeddings(tmp_path):
    model = random_llama(seed=5, tie_word_embeddings=False)
    tokenizer = byte_level_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="lm_head is not tied"):
        base_model.verify_checkpoint(tmp_path, reference_model=model)


def test_verify_detects_changed_logits(tmp_path):
    model = random_llama(seed=5)
    byte_level_tokenizer().save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="reloaded logits differ"):
        base_model.verify_checkpoint(tmp_path, reference_model=random_llama(seed=6))


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(FileNotFoundError) as raised:
        find_gguf_file()

    assert GGUF_INSTALL_COMMAND in str(raised.value)


def test_cli_default_output_under_data_dir(tiny_source, tmp_path, capsys):
    exit_code = main(["prepare-base", "--data-dir", str(tmp_path)])

    output = tmp_path / "base" / "smollm2-135m-instruct"
    assert exit_code == 0
    assert (output / "config.json").is_file()
    assert str(output) in capsys.readouterr().out


def test_cli_existing_output_error(tiny_source, tmp_path, capsys):
    output = tmp_path / "base"
    output.mkdir()

    exit_code = main(["prepare-base", "--output", str(output)])

    error = capsys.readouterr().err
    assert exit_code == 2
    assert str(output) in error
    assert "--overwrite" in error
