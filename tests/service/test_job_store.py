"""The SQLite job store, without a server."""

import sqlite3

import pytest

from service.job_store import JobDatabaseError, JobStatus, JobStore, MergeJob


def make_job(job_id: str, name: str = "merged") -> MergeJob:
    return MergeJob(
        id=job_id, base_model="base", adapter="adapter", name=name, dtype=None, verify=True
    )


def test_store_round_trip(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.insert(make_job("a"))

    store.update("a", status=JobStatus.SUCCEEDED, progress=1.0, report={"tensor_count": 20})
    job = store.get("a")

    assert job.status == JobStatus.SUCCEEDED
    assert job.progress == 1.0
    assert job.report == {"tensor_count": 20}
    assert job.verify is True
    assert store.get("missing") is None


def test_page_newest_first(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    for job_id in "abcde":
        store.insert(make_job(job_id))

    page, total = store.page(limit=2, offset=1)

    assert total == 5
    assert [job.id for job in page] == ["d", "c"]


def test_fail_unfinished_only_touches_active(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    for job_id, status in [("q", "queued"), ("r", "running"), ("s", "succeeded")]:
        store.insert(make_job(job_id, name=job_id))
        store.update(job_id, status=JobStatus(status))

    failed = store.fail_unfinished("interrupted: test")

    assert sorted(job.id for job in failed) == ["q", "r"]
    assert store.get("q").status == JobStatus.FAILED
    assert store.get("r").error == "interrupted: test"
    assert store.get("r").finished_at is not None
    assert store.get("s").status == JobStatus.SUCCEEDED
    assert store.active_job_named("q") is None


def test_update_rejects_unknown_column(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.insert(make_job("a"))

    with pytest.raises(ValueError, match="cannot update columns"):
        store.update("a", name="other")


def test_reopen_keeps_jobs(tmp_path):
    JobStore(tmp_path / "jobs.db").insert(make_job("a"))

    assert JobStore(tmp_path / "jobs.db").get("a").name == "merged"


def test_corrupt_database_rejected(tmp_path):
    path = tmp_path / "jobs.db"
    path.write_bytes(b"not a database" * 100)

    with pytest.raises(JobDatabaseError, match="move the file aside"):
        JobStore(path)


def test_newer_schema_rejected(tmp_path):
    path = tmp_path / "jobs.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()

    with pytest.raises(JobDatabaseError, match="schema version 99"):
        JobStore(path)
