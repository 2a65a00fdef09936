"""Time greedy generation of the base, merged and unmerged models side by side.

Variants, all float32 on CPU in one process and one engine (plain transformers, timed by
merger.latency.measure_latency: one prefill, then cached single-token decode steps,
exactly new_tokens tokens, EOS ignored):

- base: the real SmolLM2-135M-Instruct checkpoint.
- merged: a random FURINA adapter (E=8, S=1, r=16, non-zero magnitudes) folded into
  the base by merger.merge(verify=False). Same architecture as the base.
- furina_unmerged: the same adapter attached unmerged (furina.inject.attach_adapter).
- moe_lora_unmerged: a router MoE-LoRA (MixLoRA, random weights, same E, K and r)
  from service.moe_lora, as POST /latency/compare builds it.

Latency does not depend on the adapter's training, so random weights stand in for
trained ones. Repeats are interleaved across variants within each setting, after one
discarded warm-up run per variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import torch

from bench import common

logger = logging.getLogger("bench.inference_latency")

NAME = "inference_latency"
VARIANTS = ("base", "merged", "furina_unmerged", "moe_lora_unmerged")
LABELS = {
    "base": "base",
    "merged": "FURINA merged",
    "furina_unmerged": "FURINA unmerged",
    "moe_lora_unmerged": "MoE-LoRA (MixLoRA) unmerged",
}
MERGED_TARGET = 0.03  # merged / base median total time within 3 %
PLOT_FILE = "latency.png"


def prepare_adapter_and_merge(base: Path, work: Path) -> tuple[Path, Path]:
    """Write a random adapter and its merged checkpoint under `work`, reusing earlier ones."""
    from bench.fixtures import write_random_adapter
    from merger import merge

    adapter, merged = work / "adapter", work / "merged"
    if not (adapter / "adapter_config.json").is_file():
        write_random_adapter(base, adapter)
    if not (merged / "config.json").is_file():
        merge(base, adapter, merged, verify=False, overwrite=True)
    return adapter, merged


def load_variants(base: Path, adapter: Path, merged: Path) -> tuple[dict, dict]:
    """Load the four models; return them and the MoE-LoRA description."""
    from furina.adapter import read_adapter_config
    from furina.checkpoint import load_causal_lm
    from furina.inject import attach_adapter
    from service.moe_lora import MoeLoraSpec, attach_random_moe_lora

    models = {
        "base": load_causal_lm(base),
        "merged": load_causal_lm(merged),
        "furina_unmerged": attach_adapter(load_causal_lm(base), adapter),
    }
    spec = MoeLoraSpec.matching_adapter(read_adapter_config(adapter))
    moe_lora = load_causal_lm(base)
    attach_random_moe_lora(moe_lora, spec)
    models["moe_lora_unmerged"] = moe_lora
    return models, spec.describe()


def prompt_batch(tokenizer, prompt_tokens: int, batch_size: int) -> torch.Tensor:
    """Token ids [B, T] without padding: row b is the synthetic prompt shifted by b tokens."""
    from service.routers.latency import synthetic_prompt

    token_ids = synthetic_prompt(tokenizer, prompt_tokens + batch_size)
    rows = [token_ids[row : row + prompt_tokens] for row in range(batch_size)]
    return torch.stack(rows)


def parse_settings(text: str) -> list[dict]:
    """Parse "PROMPTxBATCHxREPEATS[xWARMUP],..." (for example "100x1x3,500x8x1x0").

    WARMUP, the discarded runs per variant before the timed ones, defaults to 1. Later
    settings of one process may use 0, because the first setting has warmed up every model.
    """
    settings = []
    for item in text.split(","):
        try:
            numbers = [int(part) for part in item.split("x")]
        except ValueError:
            numbers = []
        if len(numbers) not in (3, 4) or min(numbers) < 0 or min(numbers[:3]) < 1:
            raise ValueError(
                f"invalid setting {item!r}: expected PROMPTxBATCHxREPEATS[xWARMUP] with "
                "positive counts, e.g. 100x1x3 or 500x8x1x0"
            )
        warmup = numbers[3] if len(numbers) == 4 else 1
        settings.append(
            {
                "prompt_tokens": numbers[0],
                "batch_size": numbers[1],
                "repeats": numbers[2],
                "warmup": warmup,
            }
        )
    return settings


def kept_settings(settings: list[dict]) -> list[dict]:
    """Return the earlier run's settings whose prompt length and batch size are not re-run.

    Each kept setting carries the command and start time of the run that measured it.
    """
    path = common.RESULTS_DIR / f"{NAME}.json"
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    measured = {(s["prompt_tokens"], s["batch_size"]) for s in settings}
    kept = []
    for setting in previous["settings"]:
        if (setting["prompt_tokens"], setting["batch_size"]) not in measured:
            setting.setdefault("command", previous["command"])
            setting.setdefault("started", previous["started"])
            kept.append(setting)
    return kept


def measure_setting(models, tokenizer, setting: dict, new_tokens: int) -> dict:
    from merger.latency import measure_latency

    input_ids = prompt_batch(tokenizer, setting["prompt_tokens"], setting["batch_size"])
    started = time.perf_counter()
    stats = measure_latency(
        models, input_ids, new_tokens, setting["repeats"], warmup=setting["warmup"]
    )
    record = {
        **setting,
        "command": common.command_line(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "new_tokens": new_tokens,
        "seconds": time.perf_counter() - started,
        "variants": {name: stats[name].to_dict() for name in models},
    }
    merged_ratio = record["variants"]["merged"]["ratio_to_reference"]["total_time_s"]
    record["merged_target"] = {
        "ratio": merged_ratio,
        "tolerance": MERGED_TARGET,
        "met": abs(merged_ratio - 1) <= MERGED_TARGET,
    }
    return record


def spread(samples: list[float], digits: int = 2) -> str:
    return common.format_spread(common.summary(samples), digits)


def paired_ratios(setting: dict, variant: str) -> list[float]:
    """Return variant / base total time of each repeat, both timed in the same round.

    Load that changes between rounds scales both runs of a round alike, so these ratios
    vary less than the ratio of the two medians does.
    """
    variant_times = setting["variants"][variant]["total_time_s"]["samples"]
    base_times = setting["variants"]["base"]["total_time_s"]["samples"]
    return [mine / base for mine, base in zip(variant_times, base_times, strict=True)]


def render_markdown(results: dict) -> str:
    """Render the inference-latency section of docs/benchmarks.md."""
    lines = [
        "## Inference latency: base, merged and unmerged",
        "",
        "Greedy generation of exactly "
        f"{results['new_tokens']} new tokens on the real SmolLM2-135M-Instruct, float32, CPU, "
        "in one process with plain transformers (merger.latency.measure_latency: one prefill "
        "forward, then cached single-token steps). Repeats interleaved across variants after "
        "the discarded warm-up runs (per variant, in brackets; 0 for a setting measured "
        "after another one in the same process, whose runs warmed the models). "
        "Total time and time to first token are median "
        "(min-max) in seconds. total / base is the variant's median total time over the "
        "base's; paired total / base is the median (min-max) of the per-round ratios.",
        "",
        "| prompt tokens | batch | repeats (warm-up) | variant | total time (s) "
        "| time to first token (s) | tokens/s | total / base | paired total / base |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for setting in results["settings"]:
        for variant, row in setting["variants"].items():
            tokens_per_second = common.summary(
                [
                    setting["batch_size"] * setting["new_tokens"] / t
                    for t in row["total_time_s"]["samples"]
                ]
            )["median"]
            lines.append(
                f"| {setting['prompt_tokens']} | {setting['batch_size']} "
                f"| {setting['repeats']} ({setting.get('warmup', 1)}) "
                f"| {LABELS[variant]} | {spread(row['total_time_s']['samples'])} "
                f"| {spread(row['time_to_first_token_s']['samples'], 3)} "
                f"| {tokens_per_second:.1f} "
                f"| {row['ratio_to_reference']['total_time_s']:.3f} "
                f"| {spread(paired_ratios(setting, variant), 3)} |"
            )
    lines += ["", f"![Latency comparison](images/{PLOT_FILE})", ""]
    for setting in results["settings"]:
        target = setting["merged_target"]
        verdict = (
            "met"
            if target["met"]
            else (f"MISSED by {100 * (abs(target['ratio'] - 1) - target['tolerance']):.1f} points")
        )
        lines.append(
            f"- Target merged / base within {100 * target['tolerance']:.0f} %, prompt "
            f"{setting['prompt_tokens']}, batch {setting['batch_size']}: ratio of medians "
            f"{target['ratio']:.3f}, {verdict}. Paired per-round ratios: "
            f"{spread(paired_ratios(setting, 'merged'), 3)}."
        )
    lines += [
        "",
        f"Repeats per setting: {', '.join(str(s['repeats']) for s in results['settings'])} "
        f"(reduced from the paper's 5 runs to fit the time budget on a shared 2-core "
        "machine, so the spread columns matter). The merged model has the base's "
        "architecture and FLOPs, so any merged / base difference is timing noise.",
        f"MoE-LoRA baseline: {results['moe_lora']['implementation']}, "
        f"{results['moe_lora']['num_experts']} experts, top-{results['moe_lora']['top_k']}, "
        f"r={results['moe_lora']['r']}, random weights.",
        "",
        *common.environment_lines(results),
    ]
    other_commands = sorted(
        {s["command"] for s in results["settings"] if "command" in s} - {results["command"]}
    )
    lines += [f"- Earlier settings measured by: `{command}`." for command in other_commands]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Draw one bar panel per setting: median total time per variant, min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    settings = results["settings"]
    figure, axes = plt.subplots(1, len(settings), figsize=(max(5.0, 3.4 * len(settings)), 4.2))
    axes = [axes] if len(settings) == 1 else list(axes)
    colors = ("#4c72b0", "#55a868", "#dd8452", "#c44e52")
    for axis, setting in zip(axes, settings, strict=True):
        names = list(setting["variants"])
        totals = [setting["variants"][name]["total_time_s"]["samples"] for name in names]
        medians = [common.summary(samples)["median"] for samples in totals]
        errors = [
            [m - min(s) for m, s in zip(medians, totals, strict=True)],
            [max(s) - m for m, s in zip(medians, totals, strict=True)],
        ]
        axis.bar(range(len(names)), medians, yerr=errors, capsize=3, color=colors[: len(names)])
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(
            [LABELS[n].replace(" (MixLoRA)", "\n(MixLoRA)") for n in names],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        axis.set_title(
            f"prompt {setting['prompt_tokens']}, batch {setting['batch_size']}", fontsize=9
        )
        axis.set_ylabel(
            f"total time, {results['new_tokens']} new tokens (s)" if axis is axes[0] else ""
        )
    figure.suptitle(
        "SmolLM2-135M-Instruct, float32 CPU, greedy\nmedian total time, whiskers min-max",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=common.REAL_BASE, help="base checkpoint")
    parser.add_argument("--new-tokens", type=int, default=100, help="generated tokens per run")
    parser.add_argument(
        "--settings",
        default="100x1x3,100x8x2,500x1x2,500x8x2",
        help="comma-separated PROMPT_TOKENSxBATCHxREPEATS[xWARMUP] settings (WARMUP defaults to 1)",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite the docs block and plot from bench/results/inference_latency.json",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the settings of bench/results/inference_latency.json that this run "
        "does not measure (same prompt length and batch size are replaced)",
    )
    parser.add_argument(
        "--note", default=None, help="free text stored with the results and shown in the docs"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.docs_only:
        results = json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
        plot(results, common.IMAGES_DIR / PLOT_FILE)
        common.update_docs_block(NAME, render_markdown(results))
        return

    from furina.checkpoint import load_tokenizer

    started, wall_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    adapter, merged = prepare_adapter_and_merge(args.base, common.CACHE_DIR / "latency")
    models, moe_lora = load_variants(args.base, adapter, merged)
    tokenizer = load_tokenizer(args.base)
    results = {
        "benchmark": NAME,
        "command": common.command_line(),
        "started": started,
        "machine": common.machine_info(),
        "versions": common.package_versions(),
        "note": args.note,
        "torch_threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "moe_lora": moe_lora,
        "settings": [],
    }
    settings = parse_settings(args.settings)
    if args.append:
        results["settings"] = kept_settings(settings)
    for setting in settings:
        record = measure_setting(models, tokenizer, setting, args.new_tokens)
        logger.info(
            "prompt %d batch %d: merged/base %.3f, furina/base %.3f, moe/base %.3f (%.0f s)",
            setting["prompt_tokens"],
            setting["batch_size"],
            *(record["variants"][v]["ratio_to_reference"]["total_time_s"] for v in VARIANTS[1:]),
            record["seconds"],
        )
        results["settings"].append(record)
        results["settings"].sort(key=lambda s: (s["prompt_tokens"], s["batch_size"]))
        results["wall_seconds"] = time.perf_counter() - wall_start
        common.write_results(NAME, results)
        plot(results, common.IMAGES_DIR / PLOT_FILE)
        common.update_docs_block(NAME, render_markdown(results))
    models.clear()
    gc.collect()


if __name__ == "__main__":
    main()
