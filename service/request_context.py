"""The id of the request being handled, and logging that prints it on every line.

service.middleware sets `request_id` for each HTTP request. Sync endpoints run in
worker threads that copy the context, and merge jobs run in a copy of the context of
the request that submitted them, so their log lines carry that request's id too.
Lines logged outside any request show "-".
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"
# Accepted client ids: what tracing systems and load balancers send (UUIDs, hex, W3C
# trace ids), short enough for a log line. Others are replaced by a new id.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

request_id: ContextVar[str] = ContextVar("request_id", default="-")


def accept_or_make_request_id(header_value: str | None) -> str:
    """Return the client's X-Request-ID when it is well formed, else a new random id."""
    if header_value is not None and REQUEST_ID_PATTERN.fullmatch(header_value):
        return header_value
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Add `request_id` (the current request's id, or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str) -> None:
    """Log to stderr with the request id on every line; replaces earlier root handlers."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
