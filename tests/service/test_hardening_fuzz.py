"""Request fuzzing with schemathesis against a real `furina serve` on loopback.

Each operation of the OpenAPI schema gets FUZZ_EXAMPLES generated requests, valid and
invalid. Every response must be free of server errors (5xx) and conform to the schema:
a declared status code, content type, headers and body. The server caps generation at
a few tokens, so requests that do generate stay short. No operation is left out: the
ones that could run long (POST /merge, POST /latency/compare) need names of existing
entries, which random strings do not hit, so they return 400, 404 or 422 quickly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import ServerHandle, copy_data_dir, running_server

from service.app import create_app
from service.settings import Settings

FUZZ_EXAMPLES = 25
ANY_KEY = {"Authorization": "Bearer unused"}
# Checks that hold for every request. schemathesis's positive_data_acceptance is left
# out: a body valid per the schema may still name a model or job that does not exist.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Small, so the tests of oversized bodies send little, but above what the fuzzer sends.
MAX_BODY_BYTES = 65536
SERVER_ENV = {
    "FURINA_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    "FURINA_DEFAULT_MODEL": "base/tiny-llama",
    "FURINA_MAX_NEW_TOKENS_CAP": "4",
    "FURINA_LATENCY_MAX_PROMPT_TOKENS": "8",
    "FURINA_LATENCY_MAX_NEW_TOKENS": "4",
    "FURINA_LATENCY_MAX_REPEATS": "1",
    "FURINA_LATENCY_MAX_TOTAL_TOKENS": "100",
}


@pytest.fixture(scope="module")
def fuzz_server(data_dir_template, tmp_path_factory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("fuzz-server")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    with running_server(data_dir, root / "server.log", SERVER_ENV) as handle:
        yield handle


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


def schema_cases() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every operation, from an app built here without a server.

    Negative (schema-violating) requests only go to operations with query parameters
    or a body: a path parameter without constraints cannot be violated.
    """
    openapi = create_app(Settings(data_dir=Path("unused-data-dir"))).openapi()
    cases = []
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            query = [p for p in operation.get("parameters", []) if p["in"] == "query"]
            if query or "requestBody" in operation:
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


# NOTE: schemathesis 4.32's pytest integration (schemathesis.pytest.from_fixture) fails
# under pytest 9.2 (it reads Node._nodeid, which pytest 9 no longer has), so each
# operation runs its own Hypothesis test built from the live schema instead.
@pytest.mark.parametrize(("method", "path", "mode"), schema_cases(), ids=str)
def test_operation_conforms_to_schema(fuzz_schema, method, path, mode):
    operation = fuzz_schema[path][method]

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    # The server has no API key, so the header is fixed: a missing one is no violation.
    @given(case=operation.as_strategy(generation_mode=mode, headers=ANY_KEY))
    def check(case) -> None:
        case.call_and_validate(checks=CHECKS)

    check()


# Request bodies: too large, and not JSON


def body_operations() -> list[tuple[str, str]]:
    """(method, path) of every operation that takes a request body."""
    openapi = create_app(Settings(data_dir=Path("unused-data-dir"))).openapi()
    return [
        (method.upper(), path)
        for path, methods in openapi["paths"].items()
        for method, operation in methods.items()
        if "requestBody" in operation
    ]


def error_message(response: httpx.Response, path: str) -> str:
    """The message of an error body: OpenAI's shape under /v1/, {"detail"} elsewhere."""
    body = response.json()
    if path.startswith("/v1/"):
        assert body["error"]["type"] == "invalid_request_error", body
        return body["error"]["message"]
    return str(body["detail"])


def chunks(data: bytes, size: int = 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_body_operations_found():
    assert {("POST", "/merge"), ("POST", "/generate"), ("POST", "/v1/completions")} <= set(
        body_operations()
    )


@pytest.mark.parametrize(("method", "path"), body_operations(), ids=str)
def test_oversized_body_gets_413(fuzz_server, method, path):
    oversized = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    headers = {"Content-Type": "application/json"}
    with fuzz_server.client() as http:
        declared = http.request(method, path, content=oversized, headers=headers)
        # Without Content-Length (chunked), the limit applies while the body is read.
        streamed = http.request(method, path, content=chunks(oversized), headers=headers)
        health = http.get("/health")

    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "FURINA_MAX_BODY_BYTES" in error_message(response, path)
    assert "content-length" not in streamed.request.headers
    assert health.status_code == 200


@pytest.mark.parametrize(("method", "path"), body_operations(), ids=str)
def test_non_json_body_rejected(fuzz_server, method, path):
    """422 with FastAPI's body, or 400 with OpenAI's body under /v1/, as OpenAI's API does."""
    expected_status = 400 if path.startswith("/v1/") else 422
    with fuzz_server.client() as http:
        responses = [
            http.request(method, path, content=b"{not json", headers={"Content-Type": ctype})
            for ctype in ("application/json", "text/plain")
        ]
        responses.append(http.request(method, path, content=b"\xff\xfe\x00binary"))

    for response in responses:
        assert response.status_code == expected_status, response.text
        assert error_message(response, path)
