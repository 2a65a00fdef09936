"""Merge jobs over HTTP against a real `furina serve` process."""

import uuid
from datetime import datetime

import pytest
import torch
from service_support import (
    FINISHED,
    TINY_ADAPTER,
    TINY_BASE,
    copy_data_dir,
    submit_merge,
    wait_for_job,
)
from transformers import AutoModelForCausalLM

from furina.checkpoint import load_causal_lm
from furina.inject import attach_adapter
from furina.synthetic import write_random_llama

TINY_TENSOR_COUNT = 20  # 2 layers x (7 projections + 2 norms) + embedding + final norm
TINY_MERGED_MODULES = 14  # 2 layers x 7 projections


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_merge_job_life_cycle(server, client):
    name = unique_name("life")

    response = submit_merge(client, name)

    assert response.status_code == 202
    submitted = response.json()
    assert response.headers["location"] == f"/merge/{submitted['id']}"
    assert submitted["status"] in {"queued", "running"}
    assert submitted["report"] is None
    assert submitted["output"] is None

    job = wait_for_job(client, submitted["id"], FINISHED)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0
    assert job["error"] is None
    assert job["output"] == f"merged/{name}"
    created, started, finished = (
        datetime.fromisoformat(job[key]) for key in ("created_at", "started_at", "finished_at")
    )
    assert created <= started <= finished
    assert job["report"]["tensor_count"] == TINY_TENSOR_COUNT
    assert len(job["report"]["merged_modules"]) == TINY_MERGED_MODULES
    assert job["report"]["numerical"]["within_tolerance"] is True


def test_merged_model_matches_float64_reference(server, client):
    name = unique_name("parity")
    job = wait_for_job(client, submit_merge(client, name, verify=False).json()["id"], FINISHED)
    assert job["status"] == "succeeded", job["error"]
    base_dir = server.data_dir / "base" / TINY_BASE
    adapter_dir = server.data_dir / "adapters" / TINY_ADAPTER

    merged = AutoModelForCausalLM.from_pretrained(server.data_dir / "merged" / name)
    unmerged = attach_adapter(load_causal_lm(base_dir), adapter_dir).to(torch.float64)
    base = load_causal_lm(base_dir, torch.float64)
    input_ids = torch.tensor([[3, 72, 101, 108, 108, 111, 33]])
    with torch.no_grad():
        actual = merged(input_ids=input_ids).logits.double()
        expected = unmerged(input_ids=input_ids).logits
        base_logits = base(input_ids=input_ids).logits

    # float32 weights and forward pass against a float64 reference: rounding only.
    assert (actual - expected).abs().max().item() < 1e-4
    # The adapter moves the logits far beyond that, so the check above cannot pass vacuously.
    assert (base_logits - expected).abs().max().item() > 1e-2


def test_failed_merge_reports_error(server, client):
    # Same architecture, other weights: the adapter's base fingerprint does not match.
    write_random_llama(server.data_dir / "base" / "other-llama", seed=1)
    name = unique_name("mismatch")

    response = client.post(
        "/merge", json={"base_model": "other-llama", "adapter": TINY_ADAPTER, "name": name}
    )

    assert response.status_code == 202
    job = wait_for_job(client, response.json()["id"], FINISHED)
    assert job["status"] == "failed"
    assert "fingerprint" in job["error"]
    assert job["report"] is None
    assert not (server.data_dir / "merged" / name).exists()


def test_list_newest_first_paginated(client):
    total_before = client.get("/merge").json()["total"]
    ids = [submit_merge(client, unique_name("page"), verify=False).json()["id"] for _ in range(3)]

    first = client.get("/merge", params={"limit": 2, "offset": 0}).json()
    second = client.get("/merge", params={"limit": 2, "offset": 2}).json()

    assert first["total"] == total_before + 3
    assert (first["limit"], first["offset"]) == (2, 0)
    assert [item["id"] for item in first["items"]] == [ids[2], ids[1]]
    assert second["items"][0]["id"] == ids[0]
    assert "report" not in first["items"][0]
    for job_id in ids:
        wait_for_job(client, job_id, FINISHED)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"offset": -1}])
def test_list_rejects_bad_page(client, params):
    assert client.get("/merge", params=params).status_code == 422


def test_taken_name_conflicts(client):
    name = unique_name("taken")
    job = wait_for_job(client, submit_merge(client, name, verify=False).json()["id"], FINISHED)
    assert job["status"] == "succeeded", job["error"]

    response = submit_merge(client, name)

    assert response.status_code == 409
    assert f"merged model {name!r} already exists" in response.json()["detail"]


def test_active_job_name_conflicts(slow_client):
    name = unique_name("active")
    first = submit_merge(slow_client, name, verify=False).json()

    response = submit_merge(slow_client, name)

    assert response.status_code == 409
    assert f"merge job {first['id']}" in response.json()["detail"]
    assert slow_client.delete(f"/merge/{first['id']}").status_code in {200, 202}
    wait_for_job(slow_client, first["id"], FINISHED)


def test_unknown_names_not_found(client):
    missing_base = submit_merge(client, "x", base_model="missing")
    missing_adapter = submit_merge(client, "x", adapter="missing")

    assert missing_base.status_code == 404
    assert "base model 'missing' not found" in missing_base.json()["detail"]
    assert missing_adapter.status_code == 404
    assert "adapter 'missing' not found" in missing_adapter.json()["detail"]
    assert client.get("/merge/no-such-job").status_code == 404
    assert client.delete("/merge/no-such-job").status_code == 404


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("base_model", "/etc", "absolute path"),
        ("base_model", "../merged", "contains '..'"),
        ("adapter", "..", "contains '..'"),
        ("adapter", "a/b", "path separator"),
        ("name", ".hidden", "starts with '.'"),
        ("name", "bad name", "characters other than"),
        ("name", "", "is empty"),
    ],
)
def test_invalid_names_rejected(client, field, value, reason):
    body = {"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": "ok", field: value}

    response = client.post("/merge", json=body)

    assert response.status_code == 400
    assert reason in response.json()["detail"]


@pytest.mark.parametrize(("root", "field"), [("base", "base_model"), ("merged", "name")])
def test_symlink_out_of_root_rejected(server, client, tmp_path, root, field):
    link = unique_name("escape")
    (server.data_dir / root / link).symlink_to(tmp_path)
    body = {"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": "ok", field: link}

    response = client.post("/merge", json=body)

    assert response.status_code == 400
    assert f"resolves outside {root}/" in response.json()["detail"]
    assert str(tmp_path) not in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": "x", "dtype": "float8"},
        {"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": "x", "unknown": 1},
        {"base_model": TINY_BASE, "adapter": TINY_ADAPTER},
    ],
)
def test_invalid_request_body_rejected(client, body):
    assert client.post("/merge", json=body).status_code == 422


def test_cancel_running_job(slow_server, slow_client):
    name = unique_name("cancel")
    job_id = submit_merge(slow_client, name, verify=False).json()["id"]
    wait_for_job(slow_client, job_id, {"running"})

    response = slow_client.delete(f"/merge/{job_id}")

    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    job = wait_for_job(slow_client, job_id, FINISHED, timeout=10)
    assert job["status"] == "cancelled"
    assert job["progress"] < 1.0
    merged_root = slow_server.data_dir / "merged"
    assert not (merged_root / name).exists()
    assert list(merged_root.glob(f".{name}.*")) == []
    assert slow_client.delete(f"/merge/{job_id}").status_code == 409


def test_cancel_queued_job(slow_client):
    running_id = submit_merge(slow_client, unique_name("first"), verify=False).json()["id"]
    queued_id = submit_merge(slow_client, unique_name("second"), verify=False).json()["id"]
    wait_for_job(slow_client, running_id, {"running"})

    response = slow_client.delete(f"/merge/{queued_id}")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert slow_client.delete(f"/merge/{running_id}").status_code == 202
    wait_for_job(slow_client, running_id, FINISHED, timeout=10)
    queued = slow_client.get(f"/merge/{queued_id}").json()
    assert queued["status"] == "cancelled"
    assert queued["started_at"] is None


def test_health_answers_during_merge(slow_client):
    job_id = submit_merge(slow_client, unique_name("busy"), verify=False).json()["id"]
    wait_for_job(slow_client, job_id, {"running"})

    statuses = [slow_client.get("/health", timeout=5.0).status_code for _ in range(5)]
    job = slow_client.get(f"/merge/{job_id}").json()

    assert statuses == [200] * 5
    assert job["status"] == "running"  # the requests above overlapped the merge
    slow_client.delete(f"/merge/{job_id}")
    wait_for_job(slow_client, job_id, FINISHED, timeout=10)


def test_jobs_survive_restart(data_dir_template, tmp_path, start_server):
    data_dir = copy_data_dir(data_dir_template, tmp_path / "restart-data")
    slow = {"FURINA_MERGE_DELAY_SECONDS": "0.1"}
    first = start_server(data_dir, env=slow)
    with first.client() as http:
        done = wait_for_job(http, submit_merge(http, "kept", verify=False).json()["id"], FINISHED)
        killed_id = submit_merge(http, "killed", verify=False).json()["id"]
        wait_for_job(http, killed_id, {"running"})
    first.kill()
    assert done["status"] == "succeeded", done["error"]
    # The kill left the job's hidden temporary directory, which the next start removes.
    assert len(list((data_dir / "merged").glob(".killed.*.tmp"))) == 1

    second = start_server(data_dir, env=slow)
    with second.client() as http:
        kept = http.get(f"/merge/{done['id']}").json()
        killed = http.get(f"/merge/{killed_id}").json()
        merged_names = [item["name"] for item in http.get("/merged-models").json()]
        stopped_id = submit_merge(http, "stopped", verify=False).json()["id"]
        wait_for_job(http, stopped_id, {"running"})
    second.stop()
    assert "service stopped" in second.log()  # a graceful stop, not a kill

    assert kept["status"] == "succeeded"
    assert kept["report"]["tensor_count"] == TINY_TENSOR_COUNT
    assert killed["status"] == "failed"
    assert killed["error"].startswith("interrupted")
    assert merged_names == ["kept"]
    assert sorted(path.name for path in (data_dir / "merged").iterdir()) == ["kept"]

    third = start_server(data_dir)
    with third.client() as http:
        stopped = http.get(f"/merge/{stopped_id}").json()
        total = http.get("/merge").json()["total"]
        listed_before_retry = sorted(path.name for path in (data_dir / "merged").iterdir())
        retry_id = submit_merge(http, "killed", verify=False).json()["id"]
        retried = wait_for_job(http, retry_id, FINISHED)
        merged_names = [item["name"] for item in http.get("/merged-models").json()]
    assert stopped["status"] == "failed"
    assert stopped["error"].startswith("interrupted")
    assert total == 3
    assert listed_before_retry == ["kept"]
    # The interrupted job's name is free again.
    assert retried["status"] == "succeeded", retried["error"]
    assert merged_names == ["kept", "killed"]
