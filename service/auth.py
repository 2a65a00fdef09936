"""Optional API key, `Authorization: Bearer <key>`, on all routes but /health and the web page.

When settings.api_key is unset, every request passes. When it is set, a missing or
wrong key gets 401 with `WWW-Authenticate: Bearer`. The key is compared in constant
time and never logged.

service.app adds `require_api_key` to every router it includes except the health and
web page routers (/health, and / with its /static/ files, which contain no data), so
routers need not add it themselves. The OpenAPI schema marks those routes
with the `HTTPBearer` security scheme. /metrics, /docs and /openapi.json are behind
the key too: the schema lists every endpoint, and metrics reveal traffic. A browser
cannot send the header when it opens /docs, so with a key set, fetch /openapi.json
with the header instead (Prometheus sends it with `authorization: {credentials: KEY}`).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="The service's API key (FURINA_API_KEY), needed only when one is set.",
)


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """FastAPI dependency: raise UnauthorizedError unless the request carries the API key."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    if credentials is None:
        raise UnauthorizedError(
            "missing API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )

    expected = api_key.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise UnauthorizedError(
            "invalid API key", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )
