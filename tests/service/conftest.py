"""Fixtures for service tests; the helpers behind them are in service_support.py.

- `data_dir`: a fresh copy of a data directory with the tiny base model and adapter.
- `start_server(data_dir, env=None)`: factory for `furina serve` processes on free
  loopback ports, stopped when the test ends.
- `server` / `client`: one server for the whole session with default settings.
- `slow_server` / `slow_client`: one server whose merges wait SLOW_MERGE_DELAY seconds
  after each tensor (settings.merge_delay_seconds), so they can be cancelled or killed.
When a test fails, the log tail of every server it may have used is printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support import (
    LOG_TAIL_LINES,
    SLOW_MERGE_DELAY,
    STARTED_SERVERS,
    ServerHandle,
    build_data_dir,
    copy_data_dir,
    launch_server,
    running_server,
)


@pytest.fixture(scope="session")
def data_dir_template(tmp_path_factory) -> Path:
    return build_data_dir(tmp_path_factory.mktemp("data-template"))


@pytest.fixture
def data_dir(data_dir_template, tmp_path) -> Path:
    """A fresh data directory with the tiny base model and adapter."""
    return copy_data_dir(data_dir_template, tmp_path / "data")


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Factory: start_server(data_dir, env=None) -> ServerHandle, stopped after the test."""
    handles: list[ServerHandle] = []

    def start(data_dir: Path, env: dict[str, str] | None = None) -> ServerHandle:
        log_path = tmp_path / f"server-{len(handles)}.log"
        handle = launch_server(data_dir, log_path, env)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="session")
def server(data_dir_template, tmp_path_factory) -> Iterator[ServerHandle]:
    """One server for the session, on its own copy of the data directory; default settings."""
    root = tmp_path_factory.mktemp("server")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    with running_server(data_dir, root / "server.log") as handle:
        yield handle


@pytest.fixture(scope="session")
def slow_server(data_dir_template, tmp_path_factory) -> Iterator[ServerHandle]:
    """One server whose merges take about 5 s (SLOW_MERGE_DELAY per tensor), one at a time."""
    root = tmp_path_factory.mktemp("slow-server")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    env = {"FURINA_MERGE_DELAY_SECONDS": str(SLOW_MERGE_DELAY), "FURINA_MERGE_CONCURRENCY": "1"}
    with running_server(data_dir, root / "server.log", env) as handle:
        yield handle


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@pytest.fixture
def slow_client(slow_server) -> Iterator[httpx.Client]:
    with slow_server.client() as http:
        yield http


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(autouse=True)
def _print_server_logs_on_failure(request) -> Iterator[None]:
    first = len(STARTED_SERVERS)
    yield
    report = getattr(request.node, "report_call", None)
    if report is None or not report.failed:
        return
    # The session servers still running, and every server this test started.
    used = [
        handle
        for index, handle in enumerate(STARTED_SERVERS)
        if index >= first or handle.process.poll() is None
    ]
    for handle in used:
        lines = handle.log().splitlines()[-LOG_TAIL_LINES:]
        print(f"--- last {len(lines)} lines of {handle.log_path} ---")
        print("\n".join(lines))
