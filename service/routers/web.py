"""The web page at / and its static files, served without the API key.

The page, its script and its style sheet contain no data: every API call the script
makes sends the key that the user typed into the page (kept in sessionStorage). So
service.app includes this router with the public ones, and the API stays behind the key.

Only the files present in service/static/ when the process starts are served, by
name, so a request cannot reach another path. The Content-Security-Policy limits the
page to this origin: no scripts, styles, fonts or connections elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFoundError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
INDEX_FILE = "index.html"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new release may change the files under the same names.
    "Cache-Control": "no-cache",
}


def _static_files() -> dict[str, Path]:
    if not STATIC_DIR.is_dir():
        return {}
    return {
        path.name: path
        for path in STATIC_DIR.iterdir()
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


STATIC_FILES = _static_files()


@router.get("/")
def index_page() -> FileResponse:
    return _file_response(INDEX_FILE)


@router.get("/static/{file_name}")
def static_file(file_name: str) -> FileResponse:
    return _file_response(file_name)


def _file_response(file_name: str) -> FileResponse:
    path = STATIC_FILES.get(file_name)
    if path is None:
        raise NotFoundError(f"static file {file_name!r} not found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)
