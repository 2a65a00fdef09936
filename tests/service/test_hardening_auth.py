"""The API key guards every route of the application except the public routers.

Routes are enumerated from app.routes, so a new router or a route left out of the
OpenAPI schema is covered without editing this file. The public routes are those of
service.app.PUBLIC_ROUTER_MODULES (liveness and the web page).
"""

from __future__ import annotations

import hmac
import importlib
import re
import uuid

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from service import app as app_module
from service.app import create_app
from service.settings import Settings

API_KEY = "hardening-key-" + uuid.uuid4().hex
WRONG_KEY = "hardening-wrong-" + uuid.uuid4().hex
# Paths that must stay public however the routers change.
REQUIRED_PUBLIC = {("GET", "/health")}
# Paths that must be behind the key, whether or not the schema lists them.
REQUIRED_PROTECTED = {
    ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/ready"),
    ("POST", "/merge"), ("POST", "/generate"), ("POST", "/v1/chat/completions"),
}


def route_operations(routes) -> set[tuple[str, str]]:
    """(method, path template) of every HTTP route, included routers followed.

    HEAD and OPTIONS are left out. FastAPI 0.165 wraps included routers in app.routes,
    so the routes are read through iter_route_contexts.
    """
    operations = set()
    for context in iter_route_contexts(routes):
        methods = (context.methods or set()) - {"HEAD", "OPTIONS"}
        operations |= {(method, context.path) for method in methods}
    return operations


def public_operations() -> set[tuple[str, str]]:
    operations = set()
    for module_name in app_module.PUBLIC_ROUTER_MODULES:
        operations |= route_operations(importlib.import_module(module_name).router.routes)
    return operations


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.fixture
def keyed_app(data_dir):
    return create_app(Settings(data_dir=data_dir, api_key=API_KEY))


def test_every_route_but_public_needs_key(keyed_app):
    public = public_operations()
    protected = route_operations(keyed_app.routes) - public
    assert REQUIRED_PUBLIC <= public
    assert REQUIRED_PROTECTED <= protected

    with TestClient(keyed_app) as http:
        for method, path in sorted(protected):
            wrong_keys = ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": API_KEY})
            for headers in wrong_keys:
                response = http.request(method, concrete(path), headers=headers, json={})
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")


def test_public_routes_need_no_key(keyed_app):
    with TestClient(keyed_app) as http:
        for method, path in sorted(public_operations()):
            response = http.request(method, concrete(path))
            assert response.status_code != 401, (method, path)
        assert http.get("/health").status_code == 200


def test_key_compared_with_compare_digest(keyed_app, monkeypatch):
    calls = []
    compare_digest = hmac.compare_digest

    def spy(presented: bytes, expected: bytes) -> bool:
        calls.append((presented, expected))
        return compare_digest(presented, expected)

    monkeypatch.setattr("service.auth.hmac.compare_digest", spy)
    with TestClient(keyed_app) as http:
        right = http.get("/ready", headers={"Authorization": f"Bearer {API_KEY}"})
        wrong = http.get("/ready", headers={"Authorization": f"Bearer {WRONG_KEY}"})

    assert right.status_code == 200
    assert wrong.status_code == 401
    assert calls == [(API_KEY.encode(), API_KEY.encode()), (WRONG_KEY.encode(), API_KEY.encode())]


def test_keys_never_logged(data_dir, start_server):
    """Right and wrong keys, on good and failing requests, never reach the server log."""
    server = start_server(data_dir, env={"FURINA_API_KEY": API_KEY})
    right = {"Authorization": f"Bearer {API_KEY}"}
    wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
    with server.client() as http:
        statuses = [
            http.get("/base-models", headers=right).status_code,
            http.get("/base-models", headers=wrong).status_code,
            http.post("/generate", headers=right, json={"model": "missing"}).status_code,
            http.post("/v1/completions", headers=wrong, json={}).status_code,
            http.post("/merge", headers=right, json={"name": API_KEY}).status_code,
            http.delete("/merge/no-such-job", headers=wrong).status_code,
        ]
    log = server.log()

    assert statuses == [200, 401, 422, 401, 422, 401]
    assert "GET /base-models 401" in log  # the requests above were logged
    assert API_KEY not in log
    assert WRONG_KEY not in log
