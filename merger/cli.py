"""The `furina merge` and `furina export-lora` subcommands."""

from __future__ import annotations

import argparse

from merger.export_lora import export_lora
from merger.merge import MergeReport, merge
from merger.plan import OUTPUT_DTYPES

MIB = 1024 * 1024


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    merge_parser = subparsers.add_parser(
        "merge",
        help="fold a FURINA adapter into its base model and write a dense checkpoint",
        description=(
            "Fold a FURINA adapter into its base model and write a Hugging Face checkpoint "
            "with the base's tensor names, shapes, shards and config, plus merge_report.json."
        ),
    )
    merge_parser.add_argument("--base", required=True, help="base model checkpoint directory")
    merge_parser.add_argument("--adapter", required=True, help="FURINA adapter directory")
    merge_parser.add_argument(
        "--output", required=True, help="directory to write the merged model to"
    )
    merge_parser.add_argument(
        "--dtype",
        choices=sorted(OUTPUT_DTYPES),
        default=None,
        help="dtype of every float tensor in the output (default: keep the base's dtypes)",
    )
    merge_parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the numerical check and latency comparison; the structural check still runs",
    )
    merge_parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    merge_parser.set_defaults(handler=run_merge)

    export_parser = subparsers.add_parser(
        "export-lora",
        help="export a FURINA adapter as a standard PEFT LoRA adapter",
        description=(
            "Fold the experts of a FURINA adapter into one LoRA per module and write it in "
            "PEFT's format (rank E*r, scaling 1), loadable by PEFT and vLLM."
        ),
    )
    export_parser.add_argument("--adapter", required=True, help="FURINA adapter directory")
    export_parser.add_argument(
        "--output", required=True, help="directory to write the PEFT adapter to"
    )
    export_parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    export_parser.set_defaults(handler=run_export_lora)


def run_merge(args: argparse.Namespace) -> int:
    progress = ProgressBar()
    try:
        report = merge(
            args.base,
            args.adapter,
            args.output,
            dtype=args.dtype,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            progress=progress,
        )
    except BaseException:
        progress.close(clear=True)
        raise
    progress.close()
    print_summary(report)
    return 0


class ProgressBar:
    """A tqdm bar in percent of tensors written, opened at the first update.

    Opening it lazily keeps stderr to the one error line when the inputs are rejected,
    and a merge that fails while writing clears the bar, so the error stays alone there.
    """

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, fraction: float, message: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=100, desc="merge", bar_format="{l_bar}{bar}| {elapsed} {postfix}"
            )
        self._bar.n = round(100 * fraction, 1)
        self._bar.set_postfix_str(message[-60:], refresh=False)
        self._bar.update(0)  # redraws at most every mininterval (0.1 s), not per tensor

    def close(self, clear: bool = False) -> None:
        if self._bar is not None:
            self._bar.leave = not clear  # tqdm erases a bar with leave False on close
            self._bar.close()


def print_summary(report: MergeReport) -> None:
    print(f"merged {len(report.merged_modules)} modules into {report.output_dir}")
    print(f"tensors: {report.tensor_count}, dtype: {report.output_dtype or 'as base'}")
    for name, source in report.untied_weights.items():
        print(f"untied {name} from {source}; config.json now has tie_word_embeddings: false")
    timings = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in report.timings_s.items())
    print(f"time: {timings}")
    peak = report.memory.get("peak_rss_bytes")
    if peak is not None:
        print(f"peak RSS: {peak / MIB:.0f} MiB")

    if report.numerical is None:
        print("numerical check skipped (--no-verify); structural check passed")
        return
    numerical = report.numerical
    print(
        "logits merged vs unmerged: max abs diff "
        f"{numerical['max_abs_logit_diff_merged_vs_unmerged']:.3g}, max rel diff "
        f"{numerical['max_rel_logit_diff_merged_vs_unmerged']:.3g}; merged vs base: max abs diff "
        f"{numerical['max_abs_logit_diff_merged_vs_base']:.3g}"
    )
    print(f"greedy generations identical: {numerical['greedy_identical']}")
    if not numerical["merged_differs_from_base"]:
        print("warning: merged logits equal the base model's, so the adapter has no effect")
    for name, stats in report.latency["variants"].items():
        ratios = stats["ratio_to_reference"]
        first_token_ms = stats["time_to_first_token_s"]["median"] * 1000
        decode_ms = stats["decode_time_per_token_s"]["median"] * 1000
        print(
            f"latency {name}: time to first token {first_token_ms:.1f} ms "
            f"({ratios['time_to_first_token_s']:.2f}x base), decode {decode_ms:.1f} ms/token "
            f"({ratios['decode_time_per_token_s']:.2f}x base)"
        )


def run_export_lora(args: argparse.Namespace) -> int:
    output = export_lora(args.adapter, args.output, overwrite=args.overwrite)
    print(f"wrote PEFT LoRA adapter to {output}")
    return 0
