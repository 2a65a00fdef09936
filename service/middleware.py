"""ASGI middleware: request ids, access log, request metrics, 500 bodies and a body size limit.

Both are plain ASGI middleware: the endpoint runs in the task that set the request id,
and streamed responses pass through message by message.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import OPENAI_PREFIX, error_response
from service.metrics import ServiceMetrics
from service.request_context import REQUEST_ID_HEADER, accept_or_make_request_id, request_id

logger = logging.getLogger(__name__)

# Probes and scrapers poll these: their access lines go to DEBUG, not INFO.
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
UNMATCHED_ROUTE = "unmatched"


class RequestContextMiddleware:
    """Give each HTTP request an id, then log, time and count it by route template.

    The id is the client's X-Request-ID when well formed, else a new one; it is sent back
    in the X-Request-ID response header. An exception that no handler caught is logged
    with its traceback and turned into a 500 error response. When the response has
    already started, the exception is re-raised instead, so the server closes the connection.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        current_id = accept_or_make_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        token = request_id.set(current_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = current_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            detail = f"internal server error: the server log has details for request {current_id}"
            response = error_response(500, detail)
            await response(scope, receive, send_with_request_id)
        finally:
            self._record(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
        self.metrics.observe_request(scope["method"], route, status, seconds)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        logger.log(
            level, "%s %s %d %.1f ms", scope["method"], scope["path"], status, seconds * 1000
        )


class BodyTooLarge(HTTPException):
    """Raised from receive() when a streamed body passes the limit; handled as a 413."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"request body is larger than the limit of {max_body_bytes} bytes "
            "(FURINA_MAX_BODY_BYTES)",
        )


class BodySizeLimitMiddleware:
    """Reject request bodies larger than max_body_bytes with a 413 error response.

    A Content-Length over the limit is rejected before the application runs. A body
    without Content-Length (chunked) is counted as it is read, and the read that passes
    the limit raises BodyTooLarge, which FastAPI's exception handling turns into a 413.

    FastAPI's own `max_body_size` (0.165) is not used: its 413 body is plain text, and for
    a route that reads no body it replaces the response only after the route has run.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        too_large = BodyTooLarge(self.max_body_bytes)
        content_length = _content_length(scope)
        if content_length is not None and content_length > self.max_body_bytes:
            await _too_large_response(scope, too_large.detail)(scope, receive, send)
            return

        received = 0
        response_started = False

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large
            return message

        async def send_tracking_start(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_with_limit, send_tracking_start)
        except BodyTooLarge:
            if response_started:
                raise
            await _too_large_response(scope, too_large.detail)(scope, receive, send)


def _too_large_response(scope: Scope, detail: str) -> Response:
    """Build the 413 response: OpenAI's error body under /v1/, the service's elsewhere."""
    if scope["path"].startswith(OPENAI_PREFIX):
        # Imported here: the router module imports most of the service.
        from service.routers.openai import openai_error

        return openai_error(413, detail)
    return error_response(413, detail)


def _content_length(scope: Scope) -> int | None:
    # uvicorn rejects a malformed Content-Length; other servers may pass it through.
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None
