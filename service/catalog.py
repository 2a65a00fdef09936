"""Listings of the data directory: base models, adapters and merged models, with sizes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.paths import Root, entry_names, relative_path

logger = logging.getLogger(__name__)

# The file that makes a directory of each root an entry worth listing.
MARKER_FILES = {
    Root.BASE: "config.json",
    Root.ADAPTERS: "adapter_config.json",
    Root.MERGED: "config.json",
}
REPORT_FILE = "merge_report.json"


@dataclass(frozen=True)
class CatalogEntry:
    """One directory of a root: its name, path relative to the data dir, and size."""

    name: str
    path: str
    size_bytes: int
    directory: Path


def list_entries(data_dir: Path, root: Root) -> list[CatalogEntry]:
    """List the directories of data_dir/root that contain the root's marker file, by name."""
    entries = []
    for name in entry_names(data_dir, root):
        directory = data_dir / root / name
        if not (directory / MARKER_FILES[root]).is_file():
            logger.debug("skipped %s/%s: no %s", root.value, name, MARKER_FILES[root])
            continue
        entries.append(
            CatalogEntry(
                name=name,
                path=relative_path(root, name),
                size_bytes=directory_size(directory),
                directory=directory,
            )
        )
    return entries


def directory_size(directory: Path) -> int:
    """Sum the sizes in bytes of the files below directory, without following symbolic links."""
    total = 0
    for parent, _, files in os.walk(directory.resolve()):
        for file_name in files:
            total += os.lstat(os.path.join(parent, file_name)).st_size
    return total


def read_merge_report(merged_dir: Path) -> dict[str, Any] | None:
    """Read merged_dir/merge_report.json; None when it is missing or not a JSON object."""
    path = merged_dir / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("cannot read merge report %s: %s", path, error)
        return None
    return report if isinstance(report, dict) else None


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """Pick the facts a model list shows from a merger.MergeReport dict.

    Missing keys become None, so a report written by another release still lists.
    """
    numerical = report.get("numerical") or {}
    structure = report.get("structure") or {}
    timings = report.get("timings_s") or {}
    return {
        "base_model": _last_component(report.get("base_dir")),
        "adapter": _last_component(report.get("adapter_dir")),
        "output_dtype": report.get("output_dtype"),
        "tensor_count": report.get("tensor_count"),
        "merged_module_count": len(report.get("merged_modules") or []),
        "structure_passed": structure.get("passed"),
        "verified": bool(numerical),
        "max_rel_logit_diff_merged_vs_unmerged": numerical.get(
            "max_rel_logit_diff_merged_vs_unmerged"
        ),
        "greedy_identical": numerical.get("greedy_identical"),
        "total_seconds": timings.get("total"),
    }


def _last_component(path: object) -> str | None:
    return Path(path).name if isinstance(path, str) else None
