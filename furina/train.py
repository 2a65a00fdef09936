"""Fine-tune a FURINA adapter on a JSONL chat or prompt/completion dataset.

The loss is the next-token cross-entropy on completion tokens only, plus
selection_loss_weight * (L_div + L_bal) from every FURINA layer of the same forward pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from furina.adapter import FurinaAdapterConfig, save_adapter
from furina.checkpoint import checkpoint_fingerprint, load_causal_lm, load_tokenizer
from furina.data import Example, read_jsonl_examples, render_prompt
from furina.inject import (
    DEFAULT_TARGET_MODULES,
    adapter_state_dict,
    furina_layers,
    inject_furina,
    set_selection_tracking,
)
from furina.layer import FurinaHyperparameters
from furina.selection_loss import collect_selection_loss

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding tokens)
TRAINING_LOG_FILE = "training_log.json"


@dataclass
class TrainingConfig:
    """Optimisation settings; the defaults are the FURINA paper's (lr 2e-4, E=8, S=1, r=16, K=2)."""

    learning_rate: float = 2e-4
    steps: int = 150
    batch_size: int = 8
    max_length: int = 128
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    r: int = 16
    lora_alpha: float = 32.0
    use_rslora: bool = False
    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    eps: float = 1e-6
    selection_loss_weight: float = 0.01
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

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
class TrainingResult:
    """Losses per step and wall time of a training run."""

    task_losses: list[float]
    selection_losses: list[float]
    seconds: float


def tokenize_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) with labels set to IGNORE_INDEX on the prompt tokens.

    The completion ends with the tokenizer's end-of-sequence token, so the model
    learns where to stop. Truncation drops tokens from the end.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    completion_text = example.completion + (tokenizer.eos_token or "")
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]

    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return input_ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels tensors [B, T]."""
    length = max(len(input_ids) for input_ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(samples: list[tuple[list[int], list[int]]], batch_size: int, seed: int):
    """Yield batches forever, reshuffling the samples each epoch with a seeded generator."""
    shuffler = random.Random(seed)
    order = list(range(len(samples)))
    while True:
        shuffler.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [samples[index] for index in order[start : start + batch_size]]


def learning_rate_factor(step: int, config: TrainingConfig) -> float:
    """Linear warm-up over warmup_steps, then linear decay to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    remaining = config.steps - step
    return max(0.0, remaining / max(1, config.steps - config.warmup_steps))


def train_adapter(
    model, tokenizer, examples: list[Example], config: TrainingConfig
) -> TrainingResult:
    """Inject FURINA layers into `model` and train them in place."""
    torch.manual_seed(config.seed)
    inject_furina(model, config.hyperparameters(), config.target_modules)
    layers = [layer for _, layer in furina_layers(model)]
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    logger.info(
        "training %d FURINA parameters in %d layers",
        sum(p.numel() for p in parameters),
        len(layers),
    )

    samples = [tokenize_example(tokenizer, example, config.max_length) for example in examples]
    if len(samples) < config.batch_size:
        raise ValueError(
            f"dataset has {len(samples)} examples, fewer than batch_size {config.batch_size}: "
            "add examples or lower --batch-size"
        )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config)
    )

    model.train()
    set_selection_tracking(model, True)
    result = TrainingResult(task_losses=[], selection_losses=[], seconds=0.0)
    started = time.perf_counter()
    batches = iterate_batches(samples, config.batch_size, config.seed)
    progress = tqdm(range(config.steps), desc="train", unit="step")
    for step in progress:
        batch = collate(next(batches), pad_token_id)
        task_loss, selection_loss = training_step(model, layers, batch, config, optimizer)
        scheduler.step()

        result.task_losses.append(task_loss)
        result.selection_losses.append(selection_loss)
        progress.set_postfix(task_loss=f"{task_loss:.4f}", selection_loss=f"{selection_loss:.4f}")
        logger.debug("step %d task_loss %.4f selection_loss %.4f", step, task_loss, selection_loss)

    set_selection_tracking(model, False)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def training_step(model, layers, batch, config: TrainingConfig, optimizer) -> tuple[float, float]:
    """Run one optimisation step; return (task loss, selection loss) as floats."""
    optimizer.zero_grad(set_to_none=True)
    output = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    selection = collect_selection_loss(layers, token_mask=batch["attention_mask"])
    loss = output.loss + config.selection_loss_weight * selection.total
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite training loss {loss.item()}: lower --learning-rate or check the data"
        )
    loss.backward()
    optimizer.step()
    return output.loss.item(), selection.total.item()


def adapter_config_for(base_dir: Path, config: TrainingConfig) -> FurinaAdapterConfig:
    """Describe the trained adapter, including the base checkpoint's fingerprint."""
    return FurinaAdapterConfig(
        base_model_name_or_path=base_dir.name,
        base_model_fingerprint=checkpoint_fingerprint(base_dir),
        r=config.r,
        lora_alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        num_experts=config.num_experts,
        num_shared_experts=config.num_shared_experts,
        top_k=config.top_k,
        eps=config.eps,
        target_modules=list(config.target_modules),
        selection_loss_weight=config.selection_loss_weight,
    )


def run_training(
    base_dir: str | os.PathLike[str],
    data_file: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    config: TrainingConfig,
    overwrite: bool = False,
) -> TrainingResult:
    """Train an adapter on `data_file` over the base checkpoint and save it to `output_dir`."""
    base, output = Path(base_dir), Path(output_dir)
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"adapter output {output} already exists: pass --overwrite to replace it"
        )
    examples = read_jsonl_examples(data_file)
    adapter_config = adapter_config_for(base, config)

    model = load_causal_lm(base, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    result = train_adapter(model, tokenizer, examples, config)

    save_adapter(output, adapter_config, adapter_state_dict(model), overwrite=overwrite)
    log = {"config": asdict(config), "examples": len(examples), **asdict(result)}
    (output / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
    logger.info("trained %d steps in %.1f s, saved to %s", config.steps, result.seconds, output)
    return result


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a FURINA adapter on a JSONL dataset")
    defaults = TrainingConfig()
    parser.add_argument("--base", required=True, help="base model checkpoint directory")
    parser.add_argument(
        "--data", required=True, help="training JSONL: messages or prompt/completion lines"
    )
    parser.add_argument("--output", required=True, help="adapter directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimisation steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="examples per step"
    )
    parser.add_argument(
        "--max-length", type=int, default=defaults.max_length, help="max tokens per example"
    )
    parser.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=defaults.learning_rate,
        help="AdamW peak learning rate",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for initialisation and shuffling"
    )
    parser.add_argument(
        "-r", "--rank", dest="r", type=int, default=defaults.r, help="rank of each expert"
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        default=defaults.lora_alpha,
        help="shared-expert scaling numerator",
    )
    parser.add_argument(
        "--use-rslora", action="store_true", help="scale shared experts by lora_alpha / sqrt(r)"
    )
    parser.add_argument(
        "--num-experts", type=int, default=defaults.num_experts, help="experts per layer (E)"
    )
    parser.add_argument(
        "--num-shared-experts",
        type=int,
        default=defaults.num_shared_experts,
        help="always-on shared experts (S)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=defaults.top_k,
        help="K of the selection loss's divergence term",
    )
    parser.add_argument(
        "--selection-loss-weight",
        type=float,
        default=defaults.selection_loss_weight,
        help="weight alpha of the selection loss (0 disables it)",
    )
    parser.add_argument(
        "--target-modules",
        default=",".join(DEFAULT_TARGET_MODULES),
        help="comma-separated Linear module names to wrap",
    )
    parser.set_defaults(handler=_handle_train)


def _handle_train(args: argparse.Namespace) -> int:
    config = TrainingConfig(
        learning_rate=args.learning_rate,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_steps=min(args.warmup_steps, args.steps),
        seed=args.seed,
        r=args.r,
        lora_alpha=args.lora_alpha,
        use_rslora=args.use_rslora,
        num_experts=args.num_experts,
        num_shared_experts=args.num_shared_experts,
        top_k=args.top_k,
        selection_loss_weight=args.selection_loss_weight,
        target_modules=[name.strip() for name in args.target_modules.split(",") if name.strip()],
    )
    _validate(config)
    result = run_training(args.base, args.data, args.output, config, overwrite=args.overwrite)
    print(
        f"trained {config.steps} steps in {result.seconds:.1f} s: task loss "
        f"{result.task_losses[0]:.4f} -> {result.task_losses[-1]:.4f}, adapter written to "
        f"{args.output}"
    )
    return 0


def _validate(config: TrainingConfig) -> None:
    if config.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {config.steps}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise ValueError(f"--learning-rate must be a positive number, got {config.learning_rate}")
    if not config.target_modules:
        raise ValueError("--target-modules is empty: name at least one Linear module, e.g. q_proj")
    config.hyperparameters()  # raises ValueError naming an out-of-range setting
