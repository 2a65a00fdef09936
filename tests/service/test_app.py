"""Cross-cutting service behaviour: auth, metrics, request ids, body limit, catalog, readiness."""

import re
import shutil
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_support import FINISHED, TINY_ADAPTER, TINY_BASE, submit_merge, wait_for_job

from service.app import create_app
from service.catalog import directory_size
from service.settings import Settings

API_KEY = "test-key-" + uuid.uuid4().hex
# Served outside the OpenAPI schema but behind the key as well.
UNLISTED_PROTECTED_PATHS = ["/openapi.json", "/docs"]
# Endpoints of this package that return 200 to a plain GET with the key.
PLAIN_GET_PATHS = [
    "/ready", "/metrics", "/openapi.json", "/docs", "/base-models", "/adapters",
    "/merged-models", "/merge",
]


def schema_operations(schema: dict) -> list[tuple[str, str]]:
    """(method, path) of every operation in an OpenAPI schema, path parameters filled in."""
    operations = []
    for path, methods in schema["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        operations += [(method.upper(), concrete) for method in methods]
    return operations


@pytest.fixture
def keyed_server(data_dir, start_server):
    return start_server(data_dir, env={"FURINA_API_KEY": API_KEY})


def test_api_key_required_everywhere_but_health(keyed_server):
    with keyed_server.client() as http:
        schema = http.get("/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        operations = schema_operations(schema)
        operations += [("GET", path) for path in UNLISTED_PROTECTED_PATHS]
        assert ("POST", "/merge") in operations

        for method, path in operations:
            if path == "/health":
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
                response = http.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
                # The OpenAI-compatible routes return errors in OpenAI's shape.
                body = response.json()
                assert "API key" in (body.get("detail") or body["error"]["message"])

        assert http.get("/health").status_code == 200


def test_api_key_accepted(keyed_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with keyed_server.client(headers=headers) as http:
        for path in PLAIN_GET_PATHS:
            assert http.get(path).status_code == 200, path
        response = submit_merge(http, "with-key", verify=False)
        assert response.status_code == 202
        wait_for_job(http, response.json()["id"], FINISHED)

    assert API_KEY not in keyed_server.log()
    assert "wrong-key" not in keyed_server.log()


def test_openapi_declares_security_and_errors(client):
    schema = client.get("/openapi.json").json()

    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    submit = schema["paths"]["/merge"]["post"]
    assert submit["security"] == [{"HTTPBearer": []}]
    assert {"202", "400", "401", "404", "409", "413", "422"} <= set(submit["responses"])
    assert "security" not in schema["paths"]["/health"]["get"]


def test_metrics_prometheus_format(client):
    for _ in range(3):
        client.get("/health")
    job = wait_for_job(client, submit_merge(client, "metrics", verify=False).json()["id"], FINISHED)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    requests = {
        (sample.labels["method"], sample.labels["route"], sample.labels["status"]): sample.value
        for sample in families["furina_http_requests"].samples
        if sample.name == "furina_http_requests_total"
    }
    assert requests[("GET", "/health", "200")] >= 3
    assert requests[("GET", "/merge/{job_id}", "200")] >= 1
    durations = families["furina_http_request_duration_seconds"].samples
    assert any(
        sample.name.endswith("_count") and sample.labels["route"] == "/health"
        for sample in durations
    )
    job_samples = families["furina_merge_jobs"].samples
    jobs = {sample.labels["status"]: sample.value for sample in job_samples}
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert jobs[job["status"]] >= 1
    tokens = [s for s in families["furina_generated_tokens"].samples if s.name.endswith("_total")]
    assert len(tokens) == 1


def test_unmatched_route_counted_once(client):
    client.get(f"/no-such-path/{uuid.uuid4().hex}")

    text = client.get("/metrics").text

    assert 'route="unmatched"' in text
    assert "/no-such-path/" not in text


def test_request_id_round_trip(server, client):
    client_id = "test-" + uuid.uuid4().hex

    echoed = client.get("/merge", headers={"X-Request-ID": client_id})
    generated = client.get("/merge")
    replaced = client.get("/merge", headers={"X-Request-ID": "has spaces"})

    assert echoed.headers["x-request-id"] == client_id
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    assert wait_for_log(server, f"[{client_id}] GET /merge 200")


def test_request_id_in_job_logs(server, client):
    client_id = "merge-" + uuid.uuid4().hex
    response = client.post(
        "/merge",
        json={"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": client_id, "verify": False},
        headers={"X-Request-ID": client_id},
    )
    job_id = response.json()["id"]
    wait_for_job(client, job_id, FINISHED)

    # Lines from the worker thread that ran the merge carry the submitting request's id.
    assert wait_for_log(server, f"[{client_id}] merge job {job_id} queued -> running")
    assert wait_for_log(server, f"[{client_id}] merge job {job_id} running -> succeeded")


def wait_for_log(server, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log():
            return True
        time.sleep(0.05)
    return False


def test_body_over_limit_rejected(client):
    body = b'{"name": "' + b"x" * 1_100_000 + b'"}'
    headers = {"Content-Type": "application/json"}

    with_length = client.post("/merge", content=body, headers=headers)
    chunked = client.post("/merge", content=iter([body[:600_000], body[600_000:]]), headers=headers)

    for response in (with_length, chunked):
        assert response.status_code == 413
        assert "larger than the limit of 1048576 bytes" in response.json()["detail"]
        assert "x-request-id" in response.headers


def test_catalog_lists_models(server, client):
    (server.data_dir / "base" / "no-config").mkdir()
    hidden = server.data_dir / "base" / ".hidden"
    shutil.copytree(server.data_dir / "base" / TINY_BASE, hidden)

    base_models = {item["name"]: item for item in client.get("/base-models").json()}
    adapters = {item["name"]: item for item in client.get("/adapters").json()}

    assert base_models[TINY_BASE] == {
        "name": TINY_BASE,
        "path": f"base/{TINY_BASE}",
        "size_bytes": directory_size(server.data_dir / "base" / TINY_BASE),
    }
    assert base_models[TINY_BASE]["size_bytes"] > 0
    assert "no-config" not in base_models
    assert ".hidden" not in base_models
    assert adapters[TINY_ADAPTER]["path"] == f"adapters/{TINY_ADAPTER}"


def test_merged_models_carry_report_summary(client):
    name = "listed-" + uuid.uuid4().hex[:8]
    job = wait_for_job(client, submit_merge(client, name).json()["id"], FINISHED)
    assert job["status"] == "succeeded", job["error"]

    merged = {item["name"]: item for item in client.get("/merged-models").json()}

    assert merged[name]["path"] == f"merged/{name}"
    summary = merged[name]["report"]
    assert summary["base_model"] == TINY_BASE
    assert summary["adapter"] == TINY_ADAPTER
    assert summary["tensor_count"] == 20
    assert summary["merged_module_count"] == 14
    assert summary["structure_passed"] is True
    assert summary["verified"] is True
    assert summary["max_rel_logit_diff_merged_vs_unmerged"] < 1e-4


def test_ready_reports_checks(client):
    response = client.get("/ready")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "data_dir": "ok", "models": "ok"},
    }


def test_ready_fails_without_root(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))
    with TestClient(app) as http:
        shutil.rmtree(tmp_path / "data" / "merged")

        response = http.get("/ready")

    assert response.status_code == 503
    assert response.json()["status"] == "not ready"
    assert "merged is missing" in response.json()["checks"]["data_dir"]


def test_unhandled_error_becomes_500(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/boom", headers={"X-Request-ID": "boom-1"})

    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert "request boom-1" in response.json()["detail"]


def test_second_server_on_same_data_dir_refused(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    with TestClient(create_app(settings)):
        with pytest.raises(RuntimeError, match="another process serves the data directory"):
            with TestClient(create_app(settings)):
                pass


def test_serve_rejects_missing_key_variable(monkeypatch, capsys):
    from furina.cli import main

    monkeypatch.delenv("FURINA_TEST_NO_SUCH_KEY", raising=False)

    code = main(["serve", "--api-key-env", "FURINA_TEST_NO_SUCH_KEY", "--port", "0"])

    assert code == 2
    assert "FURINA_TEST_NO_SUCH_KEY" in capsys.readouterr().err

