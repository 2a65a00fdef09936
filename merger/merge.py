"""Merge a FURINA adapter into its base checkpoint and write a dense Hugging Face checkpoint.

`merge` validates everything it can before writing (see merger.plan), then streams the
base one shard and one tensor at a time: each targeted weight becomes W0 + B A
(merger.fold), every other tensor is copied or cast. The output has the base's tensor
names, shapes, shard files and config, and is written into a hidden temporary sibling
that is renamed into place only after the structural and numerical checks pass.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open

from furina.checkpoint import INDEX_FILE
from merger.atomic import atomic_output_dir
from merger.errors import MergeCancelled, MergeError
from merger.fold import cast_weight, merge_weight
from merger.plan import CONFIG_FILE, REPORT_FILE, MergePlan, TensorPlan, plan_merge
from merger.stream import ShardWriter
from merger.verify import (
    VerifySettings,
    check_numerics,
    check_structure,
    compare_latency,
    load_models,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]


@dataclass
class MergeReport:
    """Results and measurements of one merge, written to merge_report.json in the output."""

    output_dir: str
    base_dir: str
    adapter_dir: str
    output_dtype: str | None
    tensor_count: int
    merged_modules: list[str]
    untied_weights: dict[str, str]
    structure: dict
    numerical: dict | None
    latency: dict | None
    timings_s: dict[str, float]
    memory: dict
    versions: dict[str, str]
    adapter_config: dict

    def to_dict(self) -> dict:
        return asdict(self)


def merge(
    base_dir: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel_event: threading.Event | None = None,
    verify_settings: VerifySettings | None = None,
) -> MergeReport:
    """Merge adapter_dir into base_dir and write the dense checkpoint to output_dir.

    dtype ("float32", "bfloat16", "float16") sets the dtype of every float tensor;
    None keeps each tensor's base dtype. progress(fraction, message) is called after
    each tensor with the fraction of tensors written, then with fraction 1.0 before each
    verification step. cancel_event is checked between tensors and between steps.

    Raises MergeError for inputs that do not fit together or a failed check, and
    MergeCancelled when cancel_event is set. Either way nothing is left at output_dir
    and the temporary directory is removed.
    """
    started = time.perf_counter()
    peak_reset = _reset_peak_rss()
    rss_at_start = _proc_status_bytes("VmRSS")
    timings: dict[str, float] = {}
    report_progress = progress or _ignore_progress
    settings = verify_settings or VerifySettings()
    base_dir, adapter_dir, output_dir = Path(base_dir), Path(adapter_dir), Path(output_dir)
    _raise_if_cancelled(cancel_event)

    with _timed(timings, "validate"):
        plan = plan_merge(base_dir, adapter_dir, output_dir, dtype, overwrite)
    logger.info(
        "merging %s into %s: %d tensors in %d shards, %d adapter modules",
        adapter_dir,
        base_dir,
        plan.tensor_count,
        len(plan.shards),
        len(plan.adapter.module_paths()),
    )

    with atomic_output_dir(output_dir, overwrite) as temporary:
        with _timed(timings, "write"):
            write_merged_checkpoint(plan, temporary, report_progress, cancel_event)
        memory = {"peak_rss_bytes_after_write": _proc_status_bytes("VmHWM")}

        with _timed(timings, "structure_check"):
            structure = check_structure(plan, temporary)
        if not structure["passed"]:
            raise MergeError(
                f"structural check of the merged checkpoint failed: {json.dumps(structure)[:2000]}"
            )

        numerical = latency = None
        if verify:
            numerical, latency = _verify(
                plan, temporary, settings, timings, report_progress, cancel_event
            )

        timings["total"] = time.perf_counter() - started
        memory.update(_memory_report(peak_reset, rss_at_start))
        report = _build_report(plan, structure, numerical, latency, timings, memory)
        (temporary / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        _raise_if_cancelled(cancel_event)

    logger.info("merged checkpoint written to %s in %.1f s", output_dir, timings["total"])
    return report


def write_merged_checkpoint(
    plan: MergePlan,
    output_dir: Path,
    progress: ProgressCallback,
    cancel_event: threading.Event | None,
) -> None:
    """Write every shard, then config.json, the index and the copied non-weight files."""
    written = 0
    for shard in plan.shards:
        shard_started = time.perf_counter()
        writer = ShardWriter(
            output_dir / shard.file, [t.spec() for t in shard.tensors], shard.metadata
        )
        tensors = {tensor.name: tensor for tensor in shard.tensors}
        try:
            with safe_open(plan.base_dir / shard.file, framework="pt") as handle:
                for name in writer.order:
                    _raise_if_cancelled(cancel_event)
                    writer.write(name, _output_tensor(plan, tensors[name], handle))
                    written += 1
                    action = "merged" if tensors[name].module_path else "copied"
                    progress(written / plan.tensor_count, f"{action} {name}")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        logger.info(
            "wrote %s (%d tensors) in %.2f s",
            shard.file,
            len(shard.tensors),
            time.perf_counter() - shard_started,
        )

    _write_metadata_files(plan, output_dir)


def _output_tensor(plan: MergePlan, tensor: TensorPlan, handle) -> torch.Tensor:
    """Read one base tensor from an open safe_open handle and fold or cast it."""
    base_tensor = handle.get_tensor(tensor.source)
    if tensor.module_path is None:
        return cast_weight(tensor.name, base_tensor, tensor.dtype)
    logger.debug("folding adapter into %s", tensor.name)
    return merge_weight(base_tensor, plan.adapter, tensor.module_path, tensor.dtype)


def _write_metadata_files(plan: MergePlan, output_dir: Path) -> None:
    if plan.config_changed_keys:
        (output_dir / CONFIG_FILE).write_text(
            json.dumps(plan.config, indent=2, sort_keys=True) + "\n"
        )
    else:
        shutil.copy2(plan.base_dir / CONFIG_FILE, output_dir / CONFIG_FILE)
    if plan.index is not None:
        (output_dir / INDEX_FILE).write_text(
            json.dumps(plan.index, indent=2, sort_keys=True) + "\n"
        )

    for name in plan.copied_files:
        source = plan.base_dir / name
        if source.is_dir():
            shutil.copytree(source, output_dir / name)
        else:
            shutil.copy2(source, output_dir / name)


def _verify(
    plan: MergePlan,
    merged_dir: Path,
    settings: VerifySettings,
    timings: dict[str, float],
    progress: ProgressCallback,
    cancel_event: threading.Event | None,
) -> tuple[dict, dict]:
    def step(message: str) -> None:
        _raise_if_cancelled(cancel_event)
        progress(1.0, message)

    step("verifying: loading merged, base and unmerged models in float32")
    with _timed(timings, "load_models"):
        models = load_models(plan, merged_dir)

    step("verifying: comparing logits and greedy generations")
    with _timed(timings, "numerical_check"):
        numerical = check_numerics(plan, models, settings)

    step("verifying: timing base, merged and unmerged models")
    with _timed(timings, "latency"):
        latency = compare_latency(plan, models, settings)
    return numerical, latency


def _build_report(
    plan: MergePlan,
    structure: dict,
    numerical: dict | None,
    latency: dict | None,
    timings: dict[str, float],
    memory: dict,
) -> MergeReport:
    dtype_name = (
        None if plan.output_dtype is None else str(plan.output_dtype).removeprefix("torch.")
    )
    merged_modules = [
        t.module_path for shard in plan.shards for t in shard.tensors if t.module_path
    ]
    return MergeReport(
        output_dir=str(plan.output_dir),
        base_dir=str(plan.base_dir),
        adapter_dir=str(plan.adapter_dir),
        output_dtype=dtype_name,
        tensor_count=plan.tensor_count,
        merged_modules=sorted(merged_modules),
        untied_weights=dict(plan.untied),
        structure=structure,
        numerical=numerical,
        latency=latency,
        timings_s={phase: round(seconds, 4) for phase, seconds in timings.items()},
        memory=memory,
        versions=_versions(),
        adapter_config=plan.adapter.config.model_dump(),
    )


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    try:
        furina_version = metadata.version("furina-serve")
    except metadata.PackageNotFoundError:
        furina_version = "not installed"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "furina-serve": furina_version,
    }


def _memory_report(peak_reset: bool, rss_at_start: int | None) -> dict:
    """Peak resident memory of this process, from /proc/self/status and getrusage."""
    return {
        "rss_bytes_at_start": rss_at_start,
        "peak_rss_bytes": _proc_status_bytes("VmHWM"),
        # VmHWM covers only this merge when the reset worked; otherwise the whole process.
        "peak_rss_reset_at_start": peak_reset,
        # ru_maxrss (KiB on Linux) cannot be reset: it is the peak of the whole process.
        "process_ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "note": "per process: merges running in parallel threads share these numbers",
    }


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); return False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_bytes(field: str) -> int | None:
    """Read a `kB` field (VmRSS, VmHWM) from /proc/self/status; None off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def _raise_if_cancelled(cancel_event: threading.Event | None) -> None:
    if cancel_event is not None and cancel_event.is_set():
        raise MergeCancelled("merge cancelled: cancel_event was set")


def _ignore_progress(fraction: float, message: str) -> None:
    pass


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - started
