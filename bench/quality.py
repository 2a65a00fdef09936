"""Compare exact-match quality of FURINA, its ablations and a plain LoRA on the demo task.

Variants, all trained with furina.train's tokenization, loss masking, data order,
AdamW and learning-rate schedule, for the same steps and seeds:

- base: the untuned model.
- lora_r128: a plain PEFT LoRA of rank E*r = 128 on the same modules, about the same
  trainable parameter count as FURINA (FURINA adds one magnitude vector per layer).
- furina: E=8 experts of rank 16, 1 shared, selection loss weight 0.01.
- furina_no_shared: num_shared_experts=0, so all 8 experts are self-routed.
- furina_no_selection_loss: selection_loss_weight=0.

Results are written after every variant, so an interrupted run keeps what finished.

NOTE: the trained variants have run end to end only on a tiny synthetic base (2 steps).
On the real base only the untuned model has been scored so far.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench import common
from furina.checkpoint import load_causal_lm, load_tokenizer
from furina.data import read_jsonl_examples
from furina.evaluate import evaluate_exact_match
from furina.train import (
    TrainingConfig,
    collate,
    iterate_batches,
    learning_rate_factor,
    tokenize_example,
    train_adapter,
)

logger = logging.getLogger("bench.quality")

NAME = "quality"
VARIANTS = ("base", "furina", "lora_r128", "furina_no_shared", "furina_no_selection_loss")
LABELS = {
    "base": "base model, untuned",
    "lora_r128": "plain LoRA, rank 128 (PEFT)",
    "furina": "FURINA (E=8, S=1, r=16, alpha=0.01)",
    "furina_no_shared": "FURINA without the shared expert (S=0)",
    "furina_no_selection_loss": "FURINA without the selection loss (alpha=0)",
}


def furina_config(variant: str, config: TrainingConfig) -> TrainingConfig:
    """Return the training settings of one FURINA variant."""
    if variant == "furina":
        return config
    if variant == "furina_no_shared":
        return replace(config, num_shared_experts=0)
    if variant == "furina_no_selection_loss":
        return replace(config, selection_loss_weight=0.0)
    raise ValueError(f"unknown FURINA variant {variant!r}")


def train_plain_lora(model, tokenizer, examples, config: TrainingConfig) -> dict:
    """Wrap `model` with a PEFT LoRA of rank E*r and train it as furina.train trains FURINA.

    The LoRA scaling lora_alpha / rank equals FURINA's shared-expert scaling
    lora_alpha / r, so both start from updates of the same size.
    """
    from peft import LoraConfig, get_peft_model

    rank = config.num_experts * config.r
    torch.manual_seed(config.seed)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=config.lora_alpha * rank / config.r,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    samples = [tokenize_example(tokenizer, example, config.max_length) for example in examples]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config)
    )

    model.train()
    losses = []
    started = time.perf_counter()
    batches = iterate_batches(samples, config.batch_size, config.seed)
    for step in range(config.steps):
        batch = collate(next(batches), pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(output.loss.item())
        logger.info("lora step %d loss %.4f", step, losses[-1])
    model.eval()
    return {
        "model": model,
        "task_losses": losses,
        "seconds": time.perf_counter() - started,
        "trainable_parameters": sum(p.numel() for p in parameters),
    }


def train_variant(variant: str, base_dir: Path, examples, config: TrainingConfig) -> dict:
    """Load a fresh base model, train one variant on it and return the model and its log."""
    model = load_causal_lm(base_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(base_dir)
    if variant == "base":
        return {
            "model": model,
            "tokenizer": tokenizer,
            "task_losses": [],
            "seconds": 0.0,
            "trainable_parameters": 0,
        }
    if variant == "lora_r128":
        run = train_plain_lora(model, tokenizer, examples, config)
        return {"tokenizer": tokenizer, **run}

    variant_config = furina_config(variant, config)
    result = train_adapter(model, tokenizer, examples, variant_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": model,
        "tokenizer": tokenizer,
        "task_losses": result.task_losses,
        "selection_losses": result.selection_losses,
        "seconds": result.seconds,
        "trainable_parameters": trainable,
    }


def run_variant(variant: str, seed: int, args, train_examples, eval_examples) -> dict:
    """Train and score one (variant, seed) pair."""
    config = replace(training_config(args), seed=seed)
    run = train_variant(variant, args.base, train_examples, config)

    started = time.perf_counter()
    evaluation = evaluate_exact_match(
        run["model"],
        run["tokenizer"],
        eval_examples,
        args.max_new_tokens,
        progress=False,
        batch_size=args.eval_batch_size,
    )
    losses = run["task_losses"]
    record = {
        "variant": variant,
        "seed": seed,
        "accuracy": evaluation.accuracy,
        "correct": evaluation.correct,
        "total": evaluation.total,
        "train_seconds": round(run["seconds"], 1),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "trainable_parameters": run["trainable_parameters"],
        "first_task_loss": losses[0] if losses else None,
        "final_task_loss_mean_last_10": statistics.mean(losses[-10:]) if losses else None,
        "task_losses": losses,
        "sample_predictions": [asdict(p) for p in evaluation.predictions[:5]],
    }
    logger.info(
        "%s seed %d: exact match %.3f, %.0f s training",
        variant,
        seed,
        evaluation.accuracy,
        run["seconds"],
    )
    return record


def training_config(args) -> TrainingConfig:
    return TrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=min(TrainingConfig().warmup_steps, args.steps),
    )


def aggregate(records: list[dict]) -> dict:
    """Group records by variant: mean, min and max accuracy over seeds."""
    by_variant = {}
    for variant in VARIANTS:
        accuracies = [r["accuracy"] for r in records if r["variant"] == variant]
        if not accuracies:
            continue
        losses = [r["final_task_loss_mean_last_10"] for r in records if r["variant"] == variant]
        by_variant[variant] = {
            "mean_accuracy": statistics.mean(accuracies),
            "min_accuracy": min(accuracies),
            "max_accuracy": max(accuracies),
            "seeds": [r["seed"] for r in records if r["variant"] == variant],
            "mean_final_task_loss": None if None in losses else statistics.mean(losses),
            "trainable_parameters": next(
                r["trainable_parameters"] for r in records if r["variant"] == variant
            ),
        }
    return by_variant


def render_markdown(results: dict) -> str:
    """Render the quality section of docs/benchmarks.md from a results dict."""
    settings = results["settings"]
    finished_seeds = sorted({record["seed"] for record in results["records"]})
    lines = [
        "## Quality: FURINA, its ablations and plain LoRA on the demo task",
        "",
        "Greedy exact match on the held-out split of the date to ISO 8601 demo task "
        f"(first {settings['eval_size']} examples of eval.jsonl). Every variant trains for "
        f"{settings['steps']} steps of batch {settings['batch_size']} with AdamW at learning "
        f"rate {settings['learning_rate']} ({settings['warmup_steps']} warm-up steps, then "
        "linear decay), with furina.train's data order and loss masking. Seeds measured: "
        f"{', '.join(str(s) for s in finished_seeds)} (requested: "
        f"{', '.join(str(s) for s in settings['seeds'])}). "
        "Training is short: the numbers "
        "compare variants at equal budget, not converged models.",
        "",
        "| variant | trainable parameters | exact match, mean (min-max over seeds) "
        "| task loss, mean of last 10 steps |",
        "|---|---:|---:|---:|",
    ]
    for variant, row in results["summary"].items():
        spread = (
            f"{row['mean_accuracy']:.3f}"
            if len(row["seeds"]) == 1
            else f"{row['mean_accuracy']:.3f} ({row['min_accuracy']:.3f}-{row['max_accuracy']:.3f})"
        )
        loss = "-" if row["mean_final_task_loss"] is None else f"{row['mean_final_task_loss']:.4f}"
        lines.append(f"| {LABELS[variant]} | {row['trainable_parameters']:,} | {spread} | {loss} |")
    missing = [variant for variant in VARIANTS if variant not in results["summary"]]
    if missing:
        lines += [
            "",
            f"Not measured in this run: {', '.join(LABELS[v] for v in missing)}. "
            "`.venv/bin/python -m bench.quality` measures every variant (defaults: 60 steps, "
            "100 eval examples, seed 0). Estimate on an otherwise idle 2-core machine: about "
            "7 minutes per trained variant, from about 6 s per training step.",
        ]
    if results.get("findings"):
        lines += ["", *results["findings"]]
    lines += ["", *common.environment_lines(results)]
    return "\n".join(lines)


def findings(summary: dict, seeds: int) -> list[str]:
    """State how each variant compares with FURINA here and in arXiv:2509.14900, either way."""
    if "furina" not in summary:
        return []
    furina = summary["furina"]["mean_accuracy"]
    lines = [
        "Paper (FURINA, arXiv:2509.14900, 7 commonsense tasks, 3B-8B models): FURINA 83.6 "
        "vs LoRA 78.8; 81.1 without the shared expert; the selection loss adds 0.3 points "
        "in its ablation.",
        f"Here ({seeds} seed(s)):",
    ]
    for variant in ("lora_r128", "furina_no_shared", "furina_no_selection_loss", "base"):
        if variant in summary:
            other = summary[variant]["mean_accuracy"]
            if furina > other:
                relation = "above"
            elif furina < other:
                relation = "below"
            else:
                relation = "equal to"
            lines.append(
                f"- FURINA {furina:.3f} is {relation} {LABELS[variant]} {other:.3f} "
                f"({100 * (furina - other):+.1f} points)."
            )
    if seeds == 1:
        lines.append(
            "- One seed only: differences of a few points are within seed-to-seed variation "
            "at this training length and are not evidence either way."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=common.REAL_BASE, help="base checkpoint")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=common.DEMO_DATA,
        help="directory with train.jsonl and eval.jsonl",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out examples scored")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="generation batch")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="generated tokens per example (must cover the answer and its EOS token)",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite the docs block from bench/results/quality.json and exit",
    )
    parser.add_argument(
        "--note", default=None, help="free text stored with the results and shown in the docs"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.docs_only:
        import json

        results = json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
        common.update_docs_block(NAME, render_markdown(results))
        return

    seeds = [int(seed) for seed in args.seeds.split(",")]
    variants = [variant.strip() for variant in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")

    train_examples = read_jsonl_examples(args.data_dir / "train.jsonl")
    eval_examples = read_jsonl_examples(args.data_dir / "eval.jsonl")[: args.eval_size]
    config = training_config(args)
    started, wall_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    results = {
        "benchmark": NAME,
        "command": common.command_line(),
        "started": started,
        "machine": common.machine_info(),
        "versions": common.package_versions(),
        "note": args.note,
        "settings": {
            **{k: v for k, v in asdict(config).items() if k != "seed"},
            "seeds": seeds,
            "eval_size": len(eval_examples),
            "eval_batch_size": args.eval_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "train_examples": len(train_examples),
            "base": str(args.base.relative_to(common.REPO_ROOT))
            if args.base.is_relative_to(common.REPO_ROOT)
            else str(args.base),
        },
        "records": [],
    }

    # Seed-major order, so a run cut short still has every variant for the first seed.
    for seed in seeds:
        for variant in variants:
            if variant == "base" and seed != seeds[0]:
                continue  # the untuned model does not depend on the seed
            results["records"].append(
                run_variant(variant, seed, args, train_examples, eval_examples)
            )
            results["summary"] = aggregate(results["records"])
            finished = [len(row["seeds"]) for row in results["summary"].values()]
            results["findings"] = findings(results["summary"], min(finished))
            results["wall_seconds"] = time.perf_counter() - wall_start
            common.write_results(NAME, results)
            common.update_docs_block(NAME, render_markdown(results))


if __name__ == "__main__":
    main()
