"""SQLite record of merge jobs (data_dir/jobs.db), safe to use from several threads.

One connection in autocommit mode, used under a lock, so statements from several
threads never interleave. The WAL journal lets other processes (the sqlite3 shell, a
backup) read the file while the service writes. Timestamps are ISO 8601 strings in UTC.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE merge_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    base_model TEXT NOT NULL,
    adapter TEXT NOT NULL,
    name TEXT NOT NULL,
    dtype TEXT,
    verify INTEGER NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    report TEXT,
    request_id TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX merge_jobs_by_name_and_status ON merge_jobs (name, status);
"""
UPDATABLE_COLUMNS = frozenset(
    {"status", "progress", "message", "error", "cancel_requested", "report", "started_at",
     "finished_at"}
)


class JobDatabaseError(Exception):
    """A job database that cannot be opened or was written by a newer release."""


class JobStatus(StrEnum):
    """Life cycle state of a merge job."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class MergeJob:
    """One merge job as stored: its request, state and, once succeeded, the merge report."""

    id: str
    base_model: str
    adapter: str
    name: str
    dtype: str | None
    verify: bool
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    message: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    report: dict[str, Any] | None = None
    request_id: str | None = None
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> MergeJob:
        return cls(
            id=row["id"],
            base_model=row["base_model"],
            adapter=row["adapter"],
            name=row["name"],
            dtype=row["dtype"],
            verify=bool(row["verify"]),
            status=JobStatus(row["status"]),
            progress=row["progress"],
            message=row["message"],
            error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            report=None if row["report"] is None else json.loads(row["report"]),
            request_id=row["request_id"],
            created_at=datetime.fromisoformat(row["created_at"]),
            started_at=_parse_time(row["started_at"]),
            finished_at=_parse_time(row["finished_at"]),
        )


class JobStore:
    """Insert, update and query merge jobs in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._connection.row_factory = sqlite3.Row
            self._connection.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL loses at most the last transactions on power loss, never
            # consistency; a lost progress update or status change is acceptable here.
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._create_or_check_schema()
        except sqlite3.DatabaseError as error:
            raise JobDatabaseError(
                f"cannot open the job database {path}: {error}; move the file aside to start "
                "with an empty job list"
            ) from error

    def _create_or_check_schema(self) -> None:
        version = self._connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            with self._locked() as connection:
                connection.executescript(
                    "BEGIN;" + SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
        elif version != SCHEMA_VERSION:
            raise JobDatabaseError(
                f"the job database {self.path} has schema version {version}, this release "
                f"reads version {SCHEMA_VERSION}: upgrade furina-serve or move the file aside"
            )

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """Run several statements as one transaction (the connection autocommits otherwise)."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def insert(self, job: MergeJob) -> None:
        with self._locked() as connection:
            connection.execute(
                "INSERT INTO merge_jobs (id, status, base_model, adapter, name, dtype, verify, "
                "request_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.status.value, job.base_model, job.adapter, job.name, job.dtype,
                 int(job.verify), job.request_id, job.created_at.isoformat()),
            )

    def update(self, job_id: str, **values: Any) -> None:
        """Set the given columns of one job; datetimes, dicts and bools are converted."""
        unknown = set(values) - UPDATABLE_COLUMNS
        if unknown:
            raise ValueError(f"cannot update columns {sorted(unknown)} of a merge job")
        assignments = ", ".join(f"{column} = ?" for column in values)
        parameters = [_to_column(value) for value in values.values()]
        with self._locked() as connection:
            connection.execute(
                f"UPDATE merge_jobs SET {assignments} WHERE id = ?", (*parameters, job_id)
            )

    def get(self, job_id: str) -> MergeJob | None:
        with self._locked() as connection:
            row = connection.execute("SELECT * FROM merge_jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else MergeJob.from_row(row)

    def page(self, limit: int, offset: int) -> tuple[list[MergeJob], int]:
        """Return one page of jobs, newest first, and the total number of jobs."""
        with self._locked() as connection:
            rows = connection.execute(
                "SELECT * FROM merge_jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            total = connection.execute("SELECT COUNT(*) FROM merge_jobs").fetchone()[0]
        return [MergeJob.from_row(row) for row in rows], total

    def active_job_named(self, name: str) -> MergeJob | None:
        """Return the queued or running job that writes merged model `name`, if any."""
        with self._locked() as connection:
            row = connection.execute(
                "SELECT * FROM merge_jobs WHERE name = ? AND status IN (?, ?) LIMIT 1",
                (name, JobStatus.QUEUED.value, JobStatus.RUNNING.value),
            ).fetchone()
        return None if row is None else MergeJob.from_row(row)

    def count(self, status: JobStatus) -> int:
        with self._locked() as connection:
            return connection.execute(
                "SELECT COUNT(*) FROM merge_jobs WHERE status = ?", (status.value,)
            ).fetchone()[0]

    def fail_unfinished(self, error: str) -> list[MergeJob]:
        """Mark every queued or running job failed with `error`; return those jobs."""
        with self._write_transaction() as connection:
            rows = connection.execute(
                "SELECT * FROM merge_jobs WHERE status IN (?, ?)",
                (JobStatus.QUEUED.value, JobStatus.RUNNING.value),
            ).fetchall()
            connection.execute(
                "UPDATE merge_jobs SET status = ?, error = ?, finished_at = ? "
                "WHERE status IN (?, ?)",
                (JobStatus.FAILED.value, error, utc_now().isoformat(),
                 JobStatus.QUEUED.value, JobStatus.RUNNING.value),
            )
        return [MergeJob.from_row(row) for row in rows]

    def check(self) -> None:
        """Run a query and a write-lock probe; raises sqlite3.Error when the file is unusable."""
        with self._locked() as connection:
            connection.execute("SELECT COUNT(*) FROM merge_jobs").fetchone()
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")

    def close(self) -> None:
        with self._locked() as connection:
            connection.close()


def _to_column(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, StrEnum):
        return value.value
    return value


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)
