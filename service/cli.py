"""`furina serve`: run the HTTP service with uvicorn on one host and port."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from pydantic import ValidationError

from furina.cli import CliError

logger = logging.getLogger(__name__)


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service (merge jobs, generation, OpenAI-compatible API)",
        description="Run the HTTP service until SIGINT or SIGTERM. Other settings come from "
        "FURINA_* environment variables (see service/settings.py).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 listens on every interface)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="TCP port (default 8000; 0 picks a free port and logs it)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory with base/, adapters/, merged/ and jobs.db "
        "(default: $FURINA_DATA_DIR, else ./data)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        default=None,
        help="read the API key from environment variable NAME, so it never shows in the "
        "process list (default: $FURINA_API_KEY; no key when neither is set)",
    )
    parser.add_argument(
        "--log-level",
        dest="serve_log_level",
        metavar="LEVEL",
        default="INFO",
        help="logging level of the service (default INFO; replaces the global --log-level)",
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.request_context import configure_logging

    settings = build_settings(args.data_dir, args.api_key_env)
    configure_logging(args.serve_log_level)
    app = create_app(settings)
    listener = bind_socket(args.host, args.port)
    host, port = listener.getsockname()[:2]
    logger.info(
        "furina serve listening on http://%s:%d with data dir %s, API key %s",
        f"[{host}]" if ":" in host else host, port, settings.data_dir.resolve(),
        "required" if settings.api_key else "not required",
    )

    config = uvicorn.Config(
        app, log_config=None, access_log=False, log_level=args.serve_log_level.lower()
    )
    server = uvicorn.Server(config)
    # After a graceful shutdown on SIGINT or SIGTERM, uvicorn re-raises the signal, so
    # the process ends with that signal's status once the lifespan has logged its stop.
    server.run(sockets=[listener])
    if not server.started:
        raise CliError("the service failed to start: the log above gives the reason")
    return 0


def build_settings(data_dir: Path | None, api_key_env: str | None):
    """Build Settings from the environment, overridden by --data-dir and --api-key-env."""
    from service.settings import Settings

    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise CliError(
                f"environment variable {api_key_env} (named by --api-key-env) is not set or "
                "empty: export the API key in it first"
            )
        overrides["api_key"] = api_key

    try:
        return Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if not field:  # a check that involves several settings
            raise CliError(f"invalid settings: {first['msg']}") from error
        raise CliError(
            f"invalid setting {field} (environment variable FURINA_{field.upper()}): "
            f"{first['msg']}"
        ) from error


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so port 0 gives a port that can be logged."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise CliError(
            f"cannot listen on {host}:{port}: {error.strerror or error}; choose another "
            "--port or --host, or stop the process that uses it"
        ) from error
    return listener
