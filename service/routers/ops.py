"""Readiness, Prometheus metrics, and the OpenAPI schema and docs page (all behind the API key).

FastAPI's built-in /docs and /openapi.json are switched off in service.app and served
here instead, so the API key dependency covers them like every other route.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.from_thread
from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.dependencies import JobsDep, SettingsDep
from service.jobs import JobManager
from service.metrics import ServiceMetrics, get_metrics
from service.paths import Root
from service.remote_engine import EngineError, RemoteEngine

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

OK = "ok"


class ReadyResponse(BaseModel):
    """Readiness and the result of each check: "ok" or what is wrong."""

    status: Literal["ready", "not ready"]
    checks: dict[str, str]


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Readiness: job database, data directory, models and generation engine usable",
    responses={503: {"model": ReadyResponse, "description": "A check failed"}},
)
def ready(request: Request, settings: SettingsDep, jobs: JobsDep) -> JSONResponse:
    """Check the job database, the data directory and, when it reports one, the model registry.

    The model registry (app.state.models) takes part when it has a `ready()` method,
    which returns a truthy value when models can be served. With the "openai" generation
    backend, the engine must respond to GET /models with 200 too.
    """
    checks = {
        "database": _check_database(jobs),
        "data_dir": _check_data_dir(settings.data_dir),
    }
    models = getattr(request.app.state, "models", None)
    if hasattr(models, "ready"):
        checks["models"] = _check_models(models)
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        checks["engine"] = _check_engine(engine)

    is_ready = all(result == OK for result in checks.values())
    body = ReadyResponse(status="ready" if is_ready else "not ready", checks=checks)
    if not is_ready:
        logger.warning("not ready: %s", checks)
    return JSONResponse(status_code=200 if is_ready else 503, content=body.model_dump())


def _check_database(jobs: JobManager) -> str:
    try:
        jobs.check()
    except sqlite3.Error as error:
        return f"job database unusable: {error}"
    return OK


def _check_data_dir(data_dir: Path) -> str:
    for root in Root:
        directory = data_dir / root
        if not directory.is_dir():
            return f"{directory} is missing"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"{directory} is not writable by this process"
    return OK


def _check_models(models: Any) -> str:
    try:
        return OK if models.ready() else "the model registry is not ready"
    except Exception as error:  # a failing check reports not ready instead of a 500
        logger.exception("model registry readiness check failed")
        return f"model registry check failed: {error}"


def _check_engine(engine: RemoteEngine) -> str:
    # This sync route runs in a worker thread: run the async check on the event loop.
    try:
        anyio.from_thread.run(engine.check)
    except EngineError as error:
        return error.detail
    return OK


@router.get(
    "/metrics",
    summary="Prometheus metrics in the text exposition format",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics"}},
)
def metrics(service_metrics: Annotated[ServiceMetrics, Depends(get_metrics)]) -> Response:
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI; its scripts load from a CDN, so the page needs a browser with internet access."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")
