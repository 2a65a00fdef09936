"""Service errors and the one handler that turns them into `{"detail": "..."}` responses.

Routers raise a `ServiceError` subclass; `install_error_handlers` maps it to its status
code. FastAPI's own HTTPException and request validation errors (422) already use the
same body shape. Declare the codes an endpoint can return with `error_responses(...)`
in the route's `responses=`, so the OpenAPI schema lists them.

Plain ValueError or RuntimeError are not mapped: an unexpected exception is a bug and
becomes a 500 in service.middleware, not a client error.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ErrorBody(BaseModel):
    """Body of every error response."""

    detail: str


class ServiceError(Exception):
    """An error with a message for the API client and the HTTP status that goes with it."""

    status_code = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class InvalidNameError(ServiceError):
    """A model, adapter or job name that is not a plain name inside its data directory root."""

    status_code = 400


class UnauthorizedError(ServiceError):
    """A missing or wrong API key."""

    status_code = 401


class NotFoundError(ServiceError):
    """A model, adapter or job that does not exist."""

    status_code = 404


class ConflictError(ServiceError):
    """A request that conflicts with the current state: a taken name, a finished job."""

    status_code = 409


ERROR_DESCRIPTIONS = {
    400: "Invalid name or path",
    401: "Missing or invalid API key",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    502: "The generation engine is unreachable or failed",
    503: "Not ready",
    504: "The generation engine timed out",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """Build a route's `responses=` entry declaring ErrorBody for each status code."""
    return {
        code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS.get(code, "Error")}
        for code in status_codes
    }


def error_response(
    status_code: int, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Build the JSON error response used for every ServiceError."""
    return JSONResponse(
        status_code=status_code, content=ErrorBody(detail=detail).model_dump(), headers=headers
    )


async def handle_service_error(request: Request, error: ServiceError) -> JSONResponse:
    return error_response(error.status_code, error.detail, error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the ServiceError handler on the application."""
    app.add_exception_handler(ServiceError, handle_service_error)
