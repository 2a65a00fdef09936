"""Lists of the base models, adapters and merged models in the data directory."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel, Field, ValidationError

from service.catalog import CatalogEntry, list_entries, read_merge_report, summarize_report
from service.dependencies import SettingsDep
from service.paths import Root

logger = logging.getLogger(__name__)

router = APIRouter(tags=["catalog"])


class CatalogItem(BaseModel):
    """A directory of the data directory."""

    name: str = Field(description="the name to use in requests")
    path: str = Field(description="path relative to the data directory")
    size_bytes: int = Field(description="total size of the files below it")


class MergeReportSummary(BaseModel):
    """The main facts of a merge_report.json; null where the report lacks them."""

    base_model: str | None
    adapter: str | None
    output_dtype: str | None = Field(description="null: each tensor kept its base dtype")
    tensor_count: int | None
    merged_module_count: int
    structure_passed: bool | None
    verified: bool = Field(description="whether the numerical check against the adapter ran")
    max_rel_logit_diff_merged_vs_unmerged: float | None
    greedy_identical: bool | None
    total_seconds: float | None


class MergedModelItem(CatalogItem):
    """A merged model, with the summary of its merge report when it has one."""

    report: MergeReportSummary | None


@router.get("/base-models", response_model=list[CatalogItem], summary="List base models")
def list_base_models(settings: SettingsDep) -> list[CatalogItem]:
    """Directories of base/ that contain a config.json, by name."""
    return _items(settings, Root.BASE)


@router.get("/adapters", response_model=list[CatalogItem], summary="List FURINA adapters")
def list_adapters(settings: SettingsDep) -> list[CatalogItem]:
    """Directories of adapters/ that contain an adapter_config.json, by name."""
    return _items(settings, Root.ADAPTERS)


@router.get("/merged-models", response_model=list[MergedModelItem], summary="List merged models")
def list_merged_models(settings: SettingsDep) -> list[MergedModelItem]:
    """Directories of merged/ that contain a config.json, by name, with their merge reports."""
    items = []
    for entry in list_entries(settings.data_dir, Root.MERGED):
        items.append(
            MergedModelItem(
                name=entry.name,
                path=entry.path,
                size_bytes=entry.size_bytes,
                report=_report_summary(entry),
            )
        )
    return items


def _report_summary(entry: CatalogEntry) -> MergeReportSummary | None:
    """Summarize the entry's merge report; None when it has none or it is malformed."""
    report = read_merge_report(entry.directory)
    if report is None:
        return None
    try:
        return MergeReportSummary(**summarize_report(report))
    except (TypeError, AttributeError, ValidationError) as error:
        # A hand-edited or damaged report must not break the listing of every model.
        logger.warning("ignored malformed merge report of merged/%s: %s", entry.name, error)
        return None


def _items(settings: SettingsDep, root: Root) -> list[CatalogItem]:
    return [
        CatalogItem(name=entry.name, path=entry.path, size_bytes=entry.size_bytes)
        for entry in list_entries(settings.data_dir, root)
    ]
