"""Liveness probe. service.app includes this router without the API key dependency."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter(tags=["operations"])


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
async def health() -> HealthResponse:
    """Return 200 while the event loop runs. Needs no API key and checks nothing else."""
    return HealthResponse()
