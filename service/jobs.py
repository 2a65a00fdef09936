"""Merge jobs: submitted over HTTP, run by merger.merge in a thread pool, kept in SQLite.

Life cycle: queued -> running -> succeeded, failed or cancelled; a queued job can also
go straight to cancelled. Jobs run in a ThreadPoolExecutor with
settings.merge_concurrency workers, so the event loop keeps serving requests. Each
job writes data_dir/merged/<name>; the merger builds it in a hidden temporary sibling
that is renamed only on success, so merged/ never shows a partial model.

Restarts: every job stays in data_dir/jobs.db. A job that was queued or running when
the process stopped is marked failed with an error that starts with "interrupted".
A graceful stop (SIGINT, SIGTERM) marks it itself. After a crash or SIGKILL the next
start marks it and removes the job's leftover temporary directory. Submit such a job again.

One process per data directory: the manager holds an exclusive lock on
data_dir/jobs.db.lock and refuses to start while another process holds it.
"""

from __future__ import annotations

import contextvars
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from merger import MergeCancelled, merge
from service.errors import ConflictError, NotFoundError
from service.job_store import JobStatus, JobStore, MergeJob, utc_now
from service.paths import JOBS_DATABASE, Root, check_links_inside, ensure_layout, resolve_name
from service.request_context import request_id
from service.settings import Settings

logger = logging.getLogger(__name__)

INTERRUPTED_ERROR = "interrupted: the service stopped before this job finished; submit it again"
# Seconds between progress writes to the database; the last tensor is always written.
PROGRESS_WRITE_INTERVAL = 0.1


class DataDirInUseError(RuntimeError):
    """Another process already serves the data directory."""


@dataclass(frozen=True)
class MergeSpec:
    """Request of a merge job: entry names in base/, adapters/ and merged/, and options."""

    base_model: str
    adapter: str
    name: str
    dtype: str | None = None
    verify: bool = True


class JobManager:
    """Submit, run, cancel and look up merge jobs of one data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        ensure_layout(self.data_dir)
        self._data_dir_lock = _lock_data_dir(self.data_dir)
        try:
            self.store = JobStore(self.data_dir / JOBS_DATABASE)
        except BaseException:
            self._data_dir_lock.close()
            raise

        # Guards status transitions, so submit, cancel and the start of a job never race.
        self._lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}
        self._futures: dict[str, Future] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._fail_interrupted_jobs()

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.merge_concurrency, thread_name_prefix="merge-job"
        )
        logger.info("merge jobs run with %d workers", self.settings.merge_concurrency)

    def stop(self) -> None:
        """Cancel running jobs, wait for their workers, and mark unfinished jobs interrupted."""
        with self._lock:
            self._stopping = True
            for event in self._cancel_events.values():
                event.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

        for job in self.store.fail_unfinished(INTERRUPTED_ERROR):
            logger.warning("merge job %s %s -> failed: interrupted by the stop", job.id, job.status)
        self.store.close()
        self._data_dir_lock.close()

    def submit(self, spec: MergeSpec) -> MergeJob:
        """Queue a merge job. Raises InvalidNameError, NotFoundError or ConflictError."""
        base_dir = resolve_name(self.data_dir, Root.BASE, spec.base_model)
        adapter_dir = resolve_name(self.data_dir, Root.ADAPTERS, spec.adapter)
        output_dir = resolve_name(self.data_dir, Root.MERGED, spec.name)
        _require_dir(base_dir, Root.BASE, spec.base_model, "/base-models")
        _require_dir(adapter_dir, Root.ADAPTERS, spec.adapter, "/adapters")
        check_links_inside(self.data_dir, Root.BASE, spec.base_model)
        check_links_inside(self.data_dir, Root.ADAPTERS, spec.adapter)

        with self._lock:
            executor = self._require_executor()
            self._check_name_free(spec.name, output_dir)
            job = MergeJob(
                id=uuid.uuid4().hex,
                base_model=spec.base_model,
                adapter=spec.adapter,
                name=spec.name,
                dtype=spec.dtype,
                verify=spec.verify,
                request_id=request_id.get(),
            )
            self.store.insert(job)
            logger.info(
                "merge job %s queued: base %s, adapter %s, output merged/%s, dtype %s, verify %s",
                job.id, spec.base_model, spec.adapter, spec.name, spec.dtype, spec.verify,
            )
            self._cancel_events[job.id] = threading.Event()
            self._futures[job.id] = executor.submit(
                # The job's log lines carry the id of the request that submitted it.
                contextvars.copy_context().run, self._run, job.id, base_dir, adapter_dir, output_dir
            )
        return job

    def get(self, job_id: str) -> MergeJob:
        job = self.store.get(job_id)
        if job is None:
            raise NotFoundError(f"merge job {job_id!r} not found: GET /merge lists the jobs")
        return job

    def page(self, limit: int, offset: int) -> tuple[list[MergeJob], int]:
        return self.store.page(limit, offset)

    def count(self, status: str) -> int:
        return self.store.count(JobStatus(status))

    def cancel(self, job_id: str) -> MergeJob:
        """Cancel a queued job at once, or ask a running job to stop after its current tensor.

        Raises NotFoundError for an unknown job and ConflictError for a finished one. A
        running job that finishes before it checks the request keeps its final status.
        """
        with self._lock:
            job = self.get(job_id)
            if job.status == JobStatus.QUEUED:
                self.store.update(
                    job_id, status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utc_now()
                )
                future = self._futures.pop(job_id, None)
                if future is not None:
                    future.cancel()  # a worker that already took it reads "cancelled" and returns
                self._cancel_events.pop(job_id, None)
                logger.info("merge job %s queued -> cancelled", job_id)
            elif job.status == JobStatus.RUNNING:
                self.store.update(job_id, cancel_requested=True)
                self._cancel_events[job_id].set()
                logger.info("merge job %s: cancel requested, stopping after this step", job_id)
            else:
                raise ConflictError(
                    f"merge job {job_id} already finished with status {job.status}: "
                    "there is nothing to cancel"
                )
            return self.get(job_id)

    def check(self) -> None:
        """Raise sqlite3.Error unless the job database runs a query and takes a write lock."""
        self.store.check()

    def _check_name_free(self, name: str, output_dir: Path) -> None:
        if os.path.lexists(output_dir):
            raise ConflictError(
                f"merged model {name!r} already exists in merged/: choose another name "
                f"or delete merged/{name} first"
            )
        active = self.store.active_job_named(name)
        if active is not None:
            raise ConflictError(
                f"merge job {active.id} ({active.status}) already writes merged model {name!r}: "
                "choose another name, or cancel that job first"
            )

    def _require_executor(self) -> ThreadPoolExecutor:
        if self._executor is None or self._stopping:
            raise RuntimeError("the job manager is not running: call start() before submit()")
        return self._executor

    def _run(self, job_id: str, base_dir: Path, adapter_dir: Path, output_dir: Path) -> None:
        """Run one job in a worker thread; every outcome ends in a finished status."""
        try:
            job = self._mark_running(job_id)
            if job is None:
                return
            report = merge(
                base_dir,
                adapter_dir,
                output_dir,
                dtype=job.dtype,
                verify=job.verify,
                overwrite=False,
                progress=self._progress_callback(job_id),
                cancel_event=self._cancel_events[job_id],
            )
        except MergeCancelled:
            self._finish_cancelled(job_id)
        except (ValueError, OSError) as error:
            # MergeError, AdapterError and CheckpointError are ValueErrors: bad inputs.
            logger.warning("merge job %s running -> failed: %s", job_id, error)
            self._finish(job_id, JobStatus.FAILED, error=str(error))
        except Exception as error:
            logger.exception("merge job %s running -> failed with an unexpected error", job_id)
            self._finish(job_id, JobStatus.FAILED, error=f"internal error: {error!r}")
        else:
            self._finish(job_id, JobStatus.SUCCEEDED, progress=1.0, report=report.to_dict())
        finally:
            with self._lock:
                self._cancel_events.pop(job_id, None)
                self._futures.pop(job_id, None)

    def _mark_running(self, job_id: str) -> MergeJob | None:
        """Move a queued job to running; return None when it was cancelled meanwhile."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None or job.status != JobStatus.QUEUED:
                return None
            self.store.update(job_id, status=JobStatus.RUNNING, started_at=utc_now())
        logger.info("merge job %s queued -> running", job_id)
        return job

    def _progress_callback(self, job_id: str) -> Callable[[float, str], None]:
        cancel_event = self._cancel_events[job_id]
        delay = self.settings.merge_delay_seconds
        last_write = 0.0

        def report_progress(fraction: float, message: str) -> None:
            nonlocal last_write
            now = time.monotonic()
            if fraction >= 1.0 or now - last_write >= PROGRESS_WRITE_INTERVAL:
                self.store.update(job_id, progress=fraction, message=message)
                last_write = now
            if delay:
                cancel_event.wait(delay)  # test hook: returns early when cancelled

        return report_progress

    def _finish_cancelled(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.cancel_requested:
            self._finish(job_id, JobStatus.CANCELLED)
        else:
            self._finish(job_id, JobStatus.FAILED, error=INTERRUPTED_ERROR)

    def _finish(self, job_id: str, status: JobStatus, **values) -> None:
        self.store.update(job_id, status=status, finished_at=utc_now(), **values)
        job = self.get(job_id)
        elapsed = (job.finished_at - (job.started_at or job.created_at)).total_seconds()
        logger.info("merge job %s running -> %s after %.1f s", job_id, status, elapsed)

    def _fail_interrupted_jobs(self) -> None:
        """Mark jobs left queued or running by an earlier process failed, and clean up."""
        for job in self.store.fail_unfinished(INTERRUPTED_ERROR):
            logger.warning(
                "merge job %s %s -> failed: the previous process stopped", job.id, job.status
            )
            _remove_temporary_dirs(self.data_dir / Root.MERGED, job.name)


def _require_dir(path: Path, root: Root, name: str, listing: str) -> None:
    if not path.is_dir():
        raise NotFoundError(
            f"{root.noun} {name!r} not found in {root.value}/: GET {listing} lists them"
        )


def _remove_temporary_dirs(merged_root: Path, name: str) -> None:
    """Delete the hidden `.<name>.*.tmp` directories a killed merge left behind."""
    for temporary in merged_root.glob(f".{name}.*.tmp"):
        shutil.rmtree(temporary, ignore_errors=True)
        logger.info("removed temporary directory %s of an interrupted merge", temporary)


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Take an exclusive lock on data_dir/jobs.db.lock; the lock ends with the process."""
    lock_file = open(data_dir / f"{JOBS_DATABASE}.lock", "wb")  # closed by JobManager.stop
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        lock_file.close()
        raise DataDirInUseError(
            f"another process serves the data directory {data_dir}: stop it, or start this "
            "one with another --data-dir"
        ) from error
    return lock_file
