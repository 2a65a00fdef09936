"""Service errors and the one handler that turns them into `{"detail": "..."}` responses.

Routers raise a `ServiceError` subclass; `install_error_handlers` maps it to its status
code. FastAPI's own HTTPException and request validation errors (422) already use the
same body shape. Declare the codes an endpoint can return with `error_responses(...)`
in the route's `responses=`, so the OpenAPI schema lists them.

Paths under OPENAI_PREFIX get OpenAI's error body instead (their router,
service.routers.openai, maps its own errors). The HTTPException handler here does the
same for what happens before routing there: an unknown /v1/ path or a wrong method.

Plain ValueError or RuntimeError are not mapped: an unexpected exception is a bug and
becomes a 500 in service.middleware, not a client error.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response

# Routes under this prefix send errors with OpenAI's body (service.routers.openai).
OPENAI_PREFIX = "/v1/"


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
    503: "Not ready, or busy: retry after the Retry-After header's seconds",
    504: "The generation engine timed out",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """Build a route's `responses=` entry declaring ErrorBody for each status code."""
    return {
        code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS.get(code, "Error")}
        for code in status_codes
    }


def validation_error_responses() -> dict[int | str, dict[str, Any]]:
    """Declare a 422 whose body is FastAPI's validation error or an ErrorBody.

    For routes that raise a 422 ServiceError (a prompt the model cannot take, no
    default model) besides failing request validation. It replaces FastAPI's entry.
    """
    schemas = ["#/components/schemas/HTTPValidationError", "#/components/schemas/ErrorBody"]
    return {
        422: {
            "description": "Invalid request, or a request the model cannot serve",
            "content": {"application/json": {"schema": {"anyOf": [{"$ref": s} for s in schemas]}}},
        }
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


async def handle_http_exception(request: Request, error: HTTPException) -> Response:
    """FastAPI's own handler, except that paths under OPENAI_PREFIX get OpenAI's body."""
    if request.url.path.startswith(OPENAI_PREFIX):
        # Imported here: the router module imports this one.
        from service.routers.openai import openai_error

        return openai_error(error.status_code, str(error.detail), headers=error.headers)
    return await http_exception_handler(request, error)


async def handle_validation_error(request: Request, error: RequestValidationError) -> Response:
    """Send FastAPI's 422 body, with request bytes that are not UTF-8 shown as U+FFFD.

    FastAPI's own handler (0.165) fails with UnicodeDecodeError, a 500, when a body that
    is not JSON, sent without a JSON content type, is not valid UTF-8 either.
    """
    errors = jsonable_encoder(
        error.errors(), custom_encoder={bytes: lambda raw: raw.decode("utf-8", "replace")}
    )
    return JSONResponse(status_code=422, content={"detail": errors})


def install_error_handlers(app: FastAPI) -> None:
    """Register the ServiceError, HTTPException and request validation handlers."""
    app.add_exception_handler(ServiceError, handle_service_error)
    app.add_exception_handler(HTTPException, handle_http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
