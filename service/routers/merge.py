"""Merge jobs: submit, list, inspect and cancel merges of an adapter into a base model."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from service.dependencies import JobsDep
from service.errors import error_responses
from service.job_store import JobStatus, MergeJob
from service.jobs import MergeSpec
from service.paths import Root, relative_path

router = APIRouter(prefix="/merge", tags=["merge jobs"])

MAX_PAGE_SIZE = 100
# The largest integer SQLite stores; a larger OFFSET raises OverflowError in sqlite3.
MAX_OFFSET = 2**63 - 1


class MergeRequest(BaseModel):
    """A merge of adapters/<adapter> into base/<base_model>, written to merged/<name>."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="name of a base model in base/ (GET /base-models)")
    adapter: str = Field(description="name of a FURINA adapter in adapters/ (GET /adapters)")
    name: str = Field(description="name of the new merged model, written to merged/<name>")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="dtype of every floating-point tensor; null keeps each base tensor's dtype",
    )
    verify: bool = Field(
        default=True,
        description="compare the merged model's logits with the unmerged adapter's and time "
        "both; the job fails when they differ beyond the merger's tolerance",
    )


class MergeJobSummary(BaseModel):
    """A merge job without its report."""

    id: str
    status: JobStatus
    base_model: str
    adapter: str
    name: str
    dtype: str | None
    verify: bool
    progress: float = Field(ge=0, le=1, description="fraction of tensors written")
    message: str | None = Field(description="the merger's latest progress message")
    error: str | None = Field(description="why the job failed; starts with 'interrupted' "
                              "when the service stopped during the job")
    cancel_requested: bool
    output: str | None = Field(
        description="path of the merged model relative to the data directory, once succeeded"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class MergeJobResponse(MergeJobSummary):
    """A merge job with the merger's report (merge_report.json) once it succeeded."""

    report: dict[str, Any] | None


class MergeJobPage(BaseModel):
    """One page of merge jobs, newest first."""

    items: list[MergeJobSummary]
    total: int = Field(description="number of jobs in the database")
    limit: int
    offset: int


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=MergeJobResponse,
    summary="Submit a merge job",
    responses=error_responses(400, 404, 409, 413),
)
def submit_merge(request: MergeRequest, jobs: JobsDep, response: Response) -> MergeJobResponse:
    """Queue a merge and return at once; poll the URL in the Location header for its status."""
    job = jobs.submit(MergeSpec(**request.model_dump()))
    response.headers["Location"] = f"{router.prefix}/{job.id}"
    return _job_response(job)


@router.get("", response_model=MergeJobPage, summary="List merge jobs, newest first")
def list_merge_jobs(
    jobs: JobsDep,
    limit: int = Query(default=20, ge=1, le=MAX_PAGE_SIZE),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> MergeJobPage:
    page, total = jobs.page(limit, offset)
    items = [MergeJobSummary(**_job_fields(job)) for job in page]
    return MergeJobPage(items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=MergeJobResponse,
    summary="Get a merge job",
    responses=error_responses(404),
)
def get_merge_job(job_id: str, jobs: JobsDep) -> MergeJobResponse:
    return _job_response(jobs.get(job_id))


@router.delete(
    "/{job_id}",
    response_model=MergeJobResponse,
    summary="Cancel a merge job",
    responses={
        202: {"model": MergeJobResponse, "description": "Running job asked to stop"},
        **error_responses(404, 409),
    },
)
def cancel_merge_job(job_id: str, jobs: JobsDep, response: Response) -> MergeJobResponse:
    """Cancel a job: a queued one is cancelled at once (200), a running one is asked to stop (202).

    A running job becomes "cancelled" when the merger next checks, between tensors or
    verification steps, and leaves nothing under merged/. A finished job gets 409.
    """
    job = jobs.cancel(job_id)
    if job.status == JobStatus.RUNNING:
        response.status_code = status.HTTP_202_ACCEPTED
    return _job_response(job)


def _job_response(job: MergeJob) -> MergeJobResponse:
    return MergeJobResponse(**_job_fields(job), report=job.report)


def _job_fields(job: MergeJob) -> dict[str, Any]:
    output = relative_path(Root.MERGED, job.name) if job.status == JobStatus.SUCCEEDED else None
    return {
        "id": job.id,
        "status": job.status,
        "base_model": job.base_model,
        "adapter": job.adapter,
        "name": job.name,
        "dtype": job.dtype,
        "verify": job.verify,
        "progress": job.progress,
        "message": job.message,
        "error": job.error,
        "cancel_requested": job.cancel_requested,
        "output": output,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
