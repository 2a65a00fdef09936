"""Typed FastAPI dependencies for the objects that create_app keeps on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.jobs import JobManager
from service.settings import Settings


def get_settings_from_app(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
