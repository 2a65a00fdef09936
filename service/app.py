"""FastAPI application factory: settings, shared state, middleware and routers."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.auth import require_api_key
from service.errors import error_responses, install_error_handlers
from service.generation_slots import GenerationSlots
from service.metrics import ServiceMetrics
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.remote_engine import create_engine
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# Routers included without the API key dependency: liveness, and the web page, which
# contains no data and sends the key with each API call it makes.
PUBLIC_ROUTER_MODULES = ["service.routers.health", "service.routers.web"]
# Routers behind the API key (when settings.api_key is set); each module defines `router`.
ROUTER_MODULES = [
    "service.routers.ops",
    "service.routers.catalog",
    "service.routers.merge",
    "service.routers.generate",
    "service.routers.openai",
    "service.routers.latency",
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application.

    State lives on app.state: settings, metrics, generation_slots, jobs, models, and
    engine (the client of the OpenAI-compatible engine with the "openai" generation
    backend, else None).
    """
    settings = settings or get_settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.job_store import JobStatus
        from service.jobs import JobManager
        from service.models import ModelRegistry

        app.state.jobs = jobs = JobManager(settings)
        try:
            app.state.models = models = ModelRegistry(settings)
            try:
                metrics.track_merge_jobs([status.value for status in JobStatus], jobs.count)
                jobs.start()
                logger.info("service started with data dir %s", settings.data_dir.resolve())
                yield
            finally:
                models.close()
                if app.state.engine is not None:
                    await app.state.engine.aclose()
        finally:
            jobs.stop()
            logger.info("service stopped")

    app = FastAPI(
        title="furina-serve",
        version="0.1.0",
        description="Merge FURINA adapters into dense checkpoints and serve them.",
        lifespan=lifespan,
        # Served by service.routers.ops instead, behind the API key.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.generation_slots = GenerationSlots.from_settings(settings)
    app.state.engine = create_engine(settings)
    install_error_handlers(app)

    # The middleware added last runs first, so 413 responses get a request id too.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)

    for module_name in PUBLIC_ROUTER_MODULES:
        app.include_router(importlib.import_module(module_name).router)
    for module_name in ROUTER_MODULES:
        app.include_router(
            importlib.import_module(module_name).router,
            dependencies=[Depends(require_api_key)],
            responses=error_responses(401),
        )
    return app
