"""Measure wall time and peak memory of merging a FURINA adapter, against two references.

Variants, each run in its own Python process so that its peak RSS is its own:

- copy: shutil.copy of every file of the base checkpoint into a fresh directory, then
  fsync of every file. The I/O floor: any merge reads and writes at least this much.
- furina_merge: the CLI `furina merge --no-verify`, run in-process in the worker
  (it streams one shard at a time and fsyncs each shard it writes).
- peft_merge: the adapter exported as a rank E*r PEFT LoRA (merger.export_lora), then
  AutoModelForCausalLM.from_pretrained, PeftModel.from_pretrained, merge_and_unload and
  save_pretrained with the base's shard size, then fsync of every written file.

Repeats are interleaved (repeat k runs every variant once before repeat k + 1), so
page-cache state and background load affect the variants alike. Two times are kept:
operation time, measured inside the worker after its imports, and process time, the
worker's whole life including interpreter start and imports. Peak RSS is the worker's
VmHWM, read from /proc/self/status at its end. The ru_maxrss that os.wait4 returns is
kept in the JSON but not used: on Linux it also counts the parent's pages that the child
shared between fork and exec.

Targets: merge operation time at most 1.5x the copy; merge peak RSS at most
1.5x (largest shard + adapter file); both below the PEFT path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

logger = logging.getLogger("bench.merge_cost")

NAME = "merge_cost"
VARIANTS = ("copy", "furina_merge", "peft_merge")
TIME_RATIO_TARGET = 1.5
MEMORY_RATIO_TARGET = 1.5
MIB = 1024**2
BASE_LABELS = {
    "real": "SmolLM2-135M-Instruct (real base, float32)",
    "large": "Synthetic Llama, 0.98 B parameters, float32",
}


# Worker side: one variant, one process; prints one JSON line.


def fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def run_copy(base: Path, output: Path) -> None:
    output.mkdir(parents=True)
    for path in sorted(base.iterdir()):
        if path.is_file():
            shutil.copy(path, output / path.name)
    fsync_tree(output)


def run_furina_merge(base: Path, adapter: Path, output: Path) -> None:
    from furina.cli import main as furina_main

    argv = ["merge", "--base", str(base), "--adapter", str(adapter)]
    status = furina_main([*argv, "--output", str(output), "--no-verify"])
    if status != 0:
        raise RuntimeError(f"furina merge exited with status {status}")


def run_peft_merge(base: Path, peft_lora: Path, output: Path, shard_size: str) -> None:
    import torch
    from peft import PeftModel

    from furina.checkpoint import load_causal_lm

    model = load_causal_lm(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, peft_lora)
    model = model.merge_and_unload()
    model.save_pretrained(output, max_shard_size=shard_size)
    fsync_tree(output)


def worker(args: argparse.Namespace) -> None:
    """Run one variant once and print its operation time and RSS figures as JSON."""
    if args.worker != "copy":
        import torch  # noqa: F401  imported before the clock starts, like every library

        import furina.cli  # noqa: F401
    rss_after_imports = _status_bytes("VmRSS")
    started = time.perf_counter()
    if args.worker == "copy":
        run_copy(args.base, args.output)
    elif args.worker == "furina_merge":
        run_furina_merge(args.base, args.adapter, args.output)
    else:
        run_peft_merge(args.base, args.peft_lora, args.output, args.shard_size)
    seconds = time.perf_counter() - started
    record = {
        "operation_seconds": seconds,
        "rss_after_imports_bytes": rss_after_imports,
        "vm_hwm_bytes": _status_bytes("VmHWM"),
    }
    report = args.output / "merge_report.json"
    if report.is_file():  # furina merge's own phase timings (validate, write, checks)
        record["merge_phase_seconds"] = json.loads(report.read_text())["timings_s"]
    print("RESULT " + json.dumps(record), flush=True)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"field {field} not found in /proc/self/status")


# Parent side: fixtures, interleaved repeats, results.


def spawn(variant: str, inputs: dict, output: Path) -> dict:
    """Run one worker process; return its own timings plus wall time and ru_maxrss."""
    command = [
        sys.executable,
        "-m",
        "bench.merge_cost",
        "--worker",
        variant,
        "--base",
        str(inputs["base"]),
        "--adapter",
        str(inputs["adapter"]),
        "--peft-lora",
        str(inputs["peft_lora"]),
        "--shard-size",
        inputs["shard_size"],
        "--output",
        str(output),
    ]
    with tempfile.TemporaryFile("w+") as stdout:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=stdout, stderr=subprocess.DEVNULL, cwd=common.REPO_ROOT
        )
        _, status, usage = os.wait4(process.pid, 0)
        process_seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        text = stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{variant} worker failed with status {process.returncode}: {text}")
    record = json.loads(text.rsplit("RESULT ", 1)[1])
    record["process_seconds"] = process_seconds
    record["ru_maxrss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return record


def prepare_inputs(base: Path, work: Path) -> dict:
    """Write the random FURINA adapter and its PEFT export for one base."""
    from bench.fixtures import LARGE_BASE_SHARD_SIZE, write_random_adapter
    from furina.checkpoint import INDEX_FILE, weight_files
    from merger.export_lora import export_lora

    adapter = write_random_adapter(base, work / "adapter")
    peft_lora = export_lora(adapter, work / "peft-lora", overwrite=True)
    shards = [base / name for name in weight_files(base)]
    return {
        "base": base,
        "adapter": adapter,
        "peft_lora": peft_lora,
        # Keep the base's layout: one file stays one file, 1 GB shards stay 1 GB shards.
        "shard_size": LARGE_BASE_SHARD_SIZE if (base / INDEX_FILE).is_file() else "100GB",
        "shard_count": len(shards),
        "largest_shard_bytes": max(path.stat().st_size for path in shards),
        "checkpoint_bytes": sum(path.stat().st_size for path in base.iterdir() if path.is_file()),
        "adapter_bytes": sum(path.stat().st_size for path in adapter.iterdir()),
    }


def measure_base(label: str, base: Path, repeats: int, work: Path) -> dict:
    """Run every variant `repeats` times, interleaved, on one base checkpoint."""
    inputs = prepare_inputs(base, work)
    samples: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(repeats):
        for variant in VARIANTS:
            output = work / f"out-{variant}-{repeat}"
            record = spawn(variant, inputs, output)
            shutil.rmtree(output)
            samples[variant].append(record)
            logger.info(
                "%s repeat %d %s: %.1f s operation, %.0f MiB peak RSS",
                label,
                repeat,
                variant,
                record["operation_seconds"],
                record["vm_hwm_bytes"] / MIB,
            )
    return summarise(label, inputs, samples)


def summarise(label: str, inputs: dict, samples: dict[str, list[dict]]) -> dict:
    variants = {}
    for variant, records in samples.items():
        variants[variant] = {
            metric: common.summary([record[metric] for record in records])
            for metric in (
                "operation_seconds",
                "process_seconds",
                "vm_hwm_bytes",
                "ru_maxrss_bytes",
                "rss_after_imports_bytes",
            )
        }
    shard_plus_adapter = inputs["largest_shard_bytes"] + inputs["adapter_bytes"]
    merge, copy, peft = variants["furina_merge"], variants["copy"], variants["peft_merge"]
    time_ratio = merge["operation_seconds"]["median"] / copy["operation_seconds"]["median"]
    memory_ratio = merge["vm_hwm_bytes"]["median"] / shard_plus_adapter
    targets = {
        "merge_time_vs_copy": _target(time_ratio, TIME_RATIO_TARGET),
        "merge_peak_rss_vs_shard_plus_adapter": _target(memory_ratio, MEMORY_RATIO_TARGET),
        "merge_faster_than_peft": _target(
            merge["operation_seconds"]["median"] / peft["operation_seconds"]["median"], 1.0
        ),
        "merge_peak_rss_below_peft": _target(
            merge["vm_hwm_bytes"]["median"] / peft["vm_hwm_bytes"]["median"], 1.0
        ),
    }
    return {
        "label": label,
        "base": _display_path(inputs["base"]),
        "shard_count": inputs["shard_count"],
        "largest_shard_bytes": inputs["largest_shard_bytes"],
        "checkpoint_bytes": inputs["checkpoint_bytes"],
        "adapter_bytes": inputs["adapter_bytes"],
        "variants": variants,
        "targets": targets,
        "records": samples,
    }


def _target(ratio: float, limit: float) -> dict:
    return {"ratio": ratio, "limit": limit, "met": ratio <= limit}


def _display_path(path: Path) -> str:
    path = Path(path).resolve()
    return (
        str(path.relative_to(common.REPO_ROOT))
        if path.is_relative_to(common.REPO_ROOT)
        else str(path)
    )


def render_markdown(results: dict) -> str:
    """Render the merge-cost section of docs/benchmarks.md."""
    lines = [
        "## Merge cost: furina merge against a file copy and the PEFT path",
        "",
        "Each variant runs in its own process, repeats interleaved. copy: every checkpoint "
        "file copied and fsynced (the I/O floor). furina merge: `furina merge --no-verify` "
        "(streams one shard at a time, fsyncs each shard). PEFT: the adapter exported as a "
        "rank-128 LoRA, then from_pretrained, PeftModel.from_pretrained, merge_and_unload, "
        "save_pretrained and fsync. Operation time excludes interpreter start and imports; "
        "process time includes them. Peak RSS is the process's VmHWM. Values are "
        "median (min-max).",
    ]
    for base in results["bases"]:
        lines += [
            "",
            f"### {base['label']}",
            "",
            f"`{base['base']}`: {base['checkpoint_bytes'] / MIB:,.0f} MiB in "
            f"{base['shard_count']} shard(s), largest {base['largest_shard_bytes'] / MIB:,.0f} "
            f"MiB; FURINA adapter {base['adapter_bytes'] / MIB:,.0f} MiB; "
            f"{base['variants']['copy']['operation_seconds']['n']} interleaved repeat(s). "
            f"Command: `{base.get('command', results['command'])}` "
            f"(run {base.get('started', results['started'])}).",
            "",
            "| variant | operation time (s) | process time (s) | peak RSS (MiB) "
            "| RSS after imports (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for variant, label in (
            ("copy", "copy (I/O floor)"),
            ("furina_merge", "furina merge"),
            ("peft_merge", "PEFT merge_and_unload"),
        ):
            row = base["variants"][variant]
            lines.append(
                f"| {label} | {common.format_spread(row['operation_seconds'], 1)} "
                f"| {common.format_spread(row['process_seconds'], 1)} "
                f"| {_mib_spread(row['vm_hwm_bytes'])} "
                f"| {_mib_spread(row['rss_after_imports_bytes'])} |"
            )
        lines += ["", *phase_lines(base), *target_lines(base)]
    lines += ["", *common.environment_lines(results)]
    return "\n".join(lines)


def target_lines(base: dict) -> list[str]:
    targets = base["targets"]
    descriptions = (
        ("merge_time_vs_copy", "merge operation time / copy operation time"),
        ("merge_peak_rss_vs_shard_plus_adapter", "merge peak RSS / (largest shard + adapter)"),
        ("merge_faster_than_peft", "merge operation time / PEFT operation time"),
        ("merge_peak_rss_below_peft", "merge peak RSS / PEFT peak RSS"),
    )
    lines = []
    for key, description in descriptions:
        target = targets[key]
        verdict = "met" if target["met"] else (f"MISSED by {target['ratio'] - target['limit']:.3f}")
        lines.append(
            f"- {description}: {target['ratio']:.3f} (target at most {target['limit']:.1f}): "
            f"{verdict}."
        )
    return lines


def phase_lines(base: dict) -> list[str]:
    """State the median time of each furina merge phase, when the workers recorded them."""
    records = [
        r for r in base.get("records", {}).get("furina_merge", []) if "merge_phase_seconds" in r
    ]
    if not records:
        return []
    phases = records[0]["merge_phase_seconds"]
    medians = {
        phase: common.summary([r["merge_phase_seconds"][phase] for r in records])["median"]
        for phase in phases
    }
    text = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in medians.items())
    return [f"- furina merge phases, median from its merge_report.json: {text}."]


def _mib_spread(stats: dict) -> str:
    scaled = {key: stats[key] / MIB for key in ("median", "min", "max")} | {"n": stats["n"]}
    return common.format_spread(scaled, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per base")
    parser.add_argument(
        "--real-base", type=Path, default=common.REAL_BASE, help="the real SmolLM2-135M checkpoint"
    )
    parser.add_argument(
        "--bases",
        default="real,large",
        help="comma-separated bases to measure: real (SmolLM2-135M) and large (a synthetic "
        "0.98 B Llama built once into bench/.cache); results for bases not measured in this "
        "run are kept from bench/results/merge_cost.json",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite the docs block from bench/results/merge_cost.json",
    )
    # Worker-only options: one variant, one process.
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    for option in ("--base", "--adapter", "--peft-lora", "--output"):
        parser.add_argument(option, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard-size", help=argparse.SUPPRESS)
    parser.add_argument(
        "--note", default=None, help="free text stored with the results and shown in the docs"
    )
    args = parser.parse_args()

    if args.worker:
        worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.docs_only:
        results = json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
        common.update_docs_block(NAME, render_markdown(results))
        return

    names = [name.strip() for name in args.bases.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BASE_LABELS))
    if unknown or not names:
        parser.error(f"--bases must list some of {sorted(BASE_LABELS)}, got {args.bases!r}")

    results = load_previous_results()
    results.update(
        benchmark=NAME,
        command=common.command_line(),
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=common.machine_info(),
        versions=common.package_versions(),
        note=args.note,
    )
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        base = args.real_base
        if name == "large":
            from bench.fixtures import ensure_large_base

            base = ensure_large_base(common.CACHE_DIR)
        entry_start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="merge-cost-", dir=common.CACHE_DIR) as work:
            entry = measure_base(BASE_LABELS[name], base, args.repeats, Path(work))
        entry.update(
            name=name,
            command=results["command"],
            started=results["started"],
            repeats=args.repeats,
            wall_seconds=time.perf_counter() - entry_start,
        )
        # Re-read before writing, so a concurrent run for another base is not overwritten.
        others = [b for b in load_previous_results()["bases"] if b.get("name") != name]
        results["bases"] = sorted(
            [*others, entry], key=lambda b: list(BASE_LABELS).index(b["name"])
        )
        results["wall_seconds"] = sum(b["wall_seconds"] for b in results["bases"])
        common.write_results(NAME, results)
        common.update_docs_block(NAME, render_markdown(results))


def load_previous_results() -> dict:
    """Return the earlier results file's content, or an empty result with no bases."""
    path = common.RESULTS_DIR / f"{NAME}.json"
    if not path.is_file():
        return {"bases": []}
    previous = json.loads(path.read_text())
    previous["bases"] = [b for b in previous.get("bases", []) if b.get("name") in BASE_LABELS]
    return previous


if __name__ == "__main__":
    main()
