"""Score a causal LM by greedy exact match on a JSONL dataset.

Prompts are rendered with the chat template exactly as in training (`furina.data`),
decoded greedily in left-padded batches, and a prediction counts as correct when it
equals the reference completion after stripping surrounding whitespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from furina.checkpoint import load_causal_lm, load_tokenizer
from furina.data import Example, read_jsonl_examples, render_prompt

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """One scored example: the last prompt message, the reference and the model's output."""

    prompt: str
    reference: str
    prediction: str
    correct: bool


@dataclass(frozen=True)
class EvalResult:
    """Exact-match accuracy (correct / total) and the per-example predictions."""

    accuracy: float
    correct: int
    total: int
    predictions: list[Prediction]


def is_exact_match(prediction: str, reference: str) -> bool:
    """Return whether prediction equals reference after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def evaluate_exact_match(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> EvalResult:
    """Generate greedily for every example and score exact match against its completion."""
    if not examples:
        raise ValueError("no examples to evaluate: the dataset is empty")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be at least 1, got {max_new_tokens} "
            f"and {batch_size}"
        )

    model.eval()
    predictions = []
    with tqdm(total=len(examples), desc="eval", unit="example", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            outputs = generate_greedy(model, tokenizer, batch, max_new_tokens)
            for example, output in zip(batch, outputs, strict=True):
                predictions.append(score_prediction(example, output))
            bar.update(len(batch))

    correct = sum(prediction.correct for prediction in predictions)
    return EvalResult(
        accuracy=correct / len(predictions),
        correct=correct,
        total=len(predictions),
        predictions=predictions,
    )


def score_prediction(example: Example, output: str) -> Prediction:
    """Pair a decoded output with its example's reference and score it."""
    return Prediction(
        prompt=example.prompt_messages[-1]["content"],
        reference=example.completion,
        prediction=output.strip(),
        correct=is_exact_match(output, example.completion),
    )


@torch.inference_mode()
def generate_greedy(model, tokenizer, examples: list[Example], max_new_tokens: int) -> list[str]:
    """Decode one left-padded batch greedily and return the new text of each example.

    Generation stops at the tokenizer's end-of-sequence token. Special tokens are
    dropped from the returned text.
    """
    from transformers import GenerationConfig

    pad_token_id = padding_token_id(tokenizer)
    prompts = [render_prompt(tokenizer, example) for example in examples]
    inputs = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )

    # A fresh config instead of model.generation_config, so sampling settings saved with
    # the checkpoint (temperature, top_p, ...) do not apply.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )
    output_ids = model.generate(
        input_ids=inputs["input_ids"].to(model.device),
        attention_mask=inputs["attention_mask"].to(model.device),
        generation_config=generation_config,
    )

    new_ids = output_ids[:, inputs["input_ids"].shape[1] :]  # [B, new tokens]
    return tokenizer.batch_decode(new_ids, skip_special_tokens=True)


def padding_token_id(tokenizer) -> int:
    """Return the pad token id, falling back to the end-of-sequence token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has neither a pad nor an end-of-sequence "
        "token: set tokenizer.pad_token before evaluating"
    )


def write_eval_result(path: str | os.PathLike[str], result: EvalResult, metadata: dict) -> None:
    """Write accuracy, counts, run metadata and every prediction as one JSON file."""
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **metadata,
        "accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "predictions": [asdict(prediction) for prediction in result.predictions],
    }
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a model (optionally with a FURINA adapter) by greedy exact match",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--model", type=Path, required=True,
        help="Hugging Face checkpoint directory: the base or a merged model",
    )  # fmt: skip
    parser.add_argument(
        "--adapter", type=Path, default=None,
        help="FURINA adapter directory to attach, unmerged, to --model",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, required=True, help="JSONL dataset to score")
    parser.add_argument(
        "--limit", type=int, default=None, help="score only the first N examples (default: all)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
        help=f"maximum generated tokens per example (default {DEFAULT_MAX_NEW_TOKENS})",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"examples per generation batch (default {DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, default=None, help="write accuracy and predictions to this JSON"
    )
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    examples = read_jsonl_examples(args.data)[: args.limit]

    start = time.perf_counter()
    model = load_causal_lm(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.adapter is not None:
        from furina.inject import attach_adapter

        model = attach_adapter(model, args.adapter)
    logger.info("loaded %s in %.1f s", args.model, time.perf_counter() - start)

    start = time.perf_counter()
    result = evaluate_exact_match(
        model, tokenizer, examples, args.max_new_tokens, batch_size=args.batch_size
    )
    seconds = time.perf_counter() - start

    print(
        f"exact match: {result.accuracy:.4f} ({result.correct}/{result.total}) in {seconds:.1f} s"
    )
    if args.output is not None:
        metadata = {
            "model": str(args.model),
            "adapter": None if args.adapter is None else str(args.adapter),
            "data": str(args.data),
            "max_new_tokens": args.max_new_tokens,
            "seconds": round(seconds, 2),
        }
        write_eval_result(args.output, result, metadata)
        print(f"wrote predictions to {args.output}")
    return 0
