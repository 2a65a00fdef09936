"""Broken and hostile input files, through `furina merge` and through POST /merge.

Every case of adversarial_files.CASES must end in one clean error that names the
problem, with nothing left in the output location, and the service must stay up.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from adversarial_files import (
    ADAPTER_WEIGHTS,
    CASES,
    HUGE_BYTES,
    TINY_ADAPTER,
    TINY_BASE,
    BadInput,
    build_case,
)
from service_support import (
    FINISHED,
    REPO_ROOT,
    ServerHandle,
    copy_data_dir,
    running_server,
    wait_for_job,
)

from furina.cli import main as furina_main

# Peak RSS a rejected merge may reach. `furina merge` peaks near 360 MiB on the tiny
# model (torch and transformers imported); the hostile adapter claims 3 GiB.
MAX_REJECTED_MERGE_RSS = 1024**3
# A cold `furina merge` takes about 12 s on 2 busy CPU cores.
CLI_TIMEOUT = 120.0
CASE_NAMES = sorted(CASES)


@pytest.fixture(scope="module")
def bad_inputs_dir(data_dir_template, tmp_path_factory) -> tuple[Path, dict[str, BadInput]]:
    """A data directory with the entries of every case next to the tiny base and adapter."""
    data_dir = copy_data_dir(data_dir_template, tmp_path_factory.mktemp("bad-inputs") / "data")
    cases = {case: build_case(case, data_dir) for case in CASE_NAMES}
    return data_dir, cases


@pytest.fixture(scope="module")
def bad_inputs_server(bad_inputs_dir, tmp_path_factory) -> Iterator[ServerHandle]:
    data_dir, _ = bad_inputs_dir
    log_path = tmp_path_factory.mktemp("bad-inputs-server") / "server.log"
    with running_server(data_dir, log_path) as handle:
        yield handle


def merged_entries(data_dir: Path) -> list[str]:
    """Everything in merged/, hidden temporary directories included."""
    return sorted(entry.name for entry in (data_dir / "merged").iterdir())


def terminal_lines(output: str) -> list[str]:
    """Non-empty lines a terminal shows for output: a line ends at its last carriage return."""
    shown = [line.rsplit("\r", 1)[-1].strip() for line in output.split("\n")]
    return [line for line in shown if line]


def wait_with_peak_rss(process: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """Wait for process; return its exit code and the largest VmHWM seen, in bytes.

    ru_maxrss from wait4 is no use here: Linux folds the RSS that the child had before
    exec, a copy of this pytest process's, into it. VmHWM belongs to the new program's
    own memory map, so polling it misses at most the last poll interval before exit.
    """
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        try:
            peak = max(peak, peak_rss_bytes(process.pid))
        except (AssertionError, OSError):
            pass  # the process is exiting: its memory map is gone
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, peak
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"{process.args} still running after {timeout} s")
        time.sleep(0.02)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


# Command line


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cli_rejects_bad_input(case, bad_inputs_dir, tmp_path, capsys, caplog):
    data_dir, cases = bad_inputs_dir
    bad = cases[case]
    output = tmp_path / "out"
    arguments = [
        "merge",
        "--base", str(data_dir / "base" / bad.base),
        "--adapter", str(data_dir / "adapters" / bad.adapter),
        "--output", str(output),
        "--no-verify",
    ]
    capsys.readouterr()

    with caplog.at_level(logging.WARNING):
        code = furina_main(arguments)
    captured = capsys.readouterr()

    lines = terminal_lines(captured.err)
    assert code == 2
    assert captured.out == ""
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("furina merge: error: ")
    assert bad.reason in lines[0]
    # At the default level WARNING, each record would be one more line on stderr.
    assert [record.getMessage() for record in caplog.records] == []
    assert sorted(entry.name for entry in tmp_path.iterdir()) == []


def test_cli_huge_tensor_rejected_before_read(bad_inputs_dir, tmp_path):
    """The real command in its own process: one line on stderr and a bounded peak RSS."""
    data_dir, cases = bad_inputs_dir
    bad = cases["huge_sparse_adapter_tensor"]
    assert (data_dir / "adapters" / bad.adapter / ADAPTER_WEIGHTS).stat().st_size > HUGE_BYTES
    command = [
        sys.executable, "-m", "furina.cli", "merge",
        "--base", str(data_dir / "base" / bad.base),
        "--adapter", str(data_dir / "adapters" / bad.adapter),
        "--output", str(tmp_path / "out"),
    ]
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    exit_code, peak_rss = wait_with_peak_rss(process, CLI_TIMEOUT)

    error = stderr_path.read_text()
    assert exit_code == 2
    assert len(error.strip().splitlines()) == 1, error
    assert bad.reason in error
    assert 0 < peak_rss < MAX_REJECTED_MERGE_RSS
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["stderr.txt"]


# HTTP API


@pytest.mark.parametrize("case", CASE_NAMES)
def test_api_merge_fails_cleanly(case, bad_inputs_dir, bad_inputs_server):
    data_dir, cases = bad_inputs_dir
    bad = cases[case]
    body = {"base_model": bad.base, "adapter": bad.adapter, "name": f"out-{uuid.uuid4().hex[:8]}"}

    with bad_inputs_server.client() as http:
        response = http.post("/merge", json=body)
        assert response.status_code == 202, response.text
        job = wait_for_job(http, response.json()["id"], FINISHED)
        health = http.get("/health")

    assert job["status"] == "failed"
    assert bad.reason in job["error"]
    assert not job["error"].startswith("internal error")
    assert job["output"] is None
    assert health.status_code == 200
    assert merged_entries(data_dir) == []
    # A failure on bad input is one warning line, while a traceback means an unexpected error.
    assert "Traceback" not in bad_inputs_server.log()


def test_api_huge_tensor_keeps_server_rss_bounded(bad_inputs_dir, bad_inputs_server):
    data_dir, cases = bad_inputs_dir
    bad = cases["huge_sparse_adapter_tensor"]
    body = {"base_model": bad.base, "adapter": bad.adapter, "name": "huge-rss"}

    with bad_inputs_server.client() as http:
        job = wait_for_job(http, http.post("/merge", json=body).json()["id"], FINISHED)

    assert job["status"] == "failed"
    assert bad.reason in job["error"]
    assert peak_rss_bytes(bad_inputs_server.process.pid) < MAX_REJECTED_MERGE_RSS


# Symbolic links that leave the data directory (API only: the CLI reads whatever path
# its user names, links included)


@pytest.fixture
def symlink_server(data_dir, start_server) -> ServerHandle:
    return start_server(data_dir)


def submit(http: httpx.Client, base: str, adapter: str, name: str = "linked") -> httpx.Response:
    body = {"base_model": base, "adapter": adapter, "name": name, "verify": False}
    return http.post("/merge", json=body)


def test_symlinks_out_of_data_dir_rejected(symlink_server, tmp_path):
    data_dir = symlink_server.data_dir
    outside = tmp_path / "outside"
    shutil.copytree(data_dir / "adapters" / TINY_ADAPTER, outside / "adapter")
    shutil.copytree(data_dir / "base" / TINY_BASE, outside / "base")
    (outside / "secret.json").write_text('{"secret": true}')

    (data_dir / "adapters" / "linked-adapter").symlink_to(outside / "adapter")
    inner_adapter = shutil.copytree(
        data_dir / "adapters" / TINY_ADAPTER, data_dir / "adapters" / "inner-link"
    )
    (inner_adapter / ADAPTER_WEIGHTS).unlink()
    (inner_adapter / ADAPTER_WEIGHTS).symlink_to(outside / "adapter" / ADAPTER_WEIGHTS)
    inner_base = shutil.copytree(data_dir / "base" / TINY_BASE, data_dir / "base" / "inner-link")
    (inner_base / "tokenizer.json").unlink()
    (inner_base / "tokenizer.json").symlink_to(outside / "secret.json")
    (data_dir / "base" / "loop").symlink_to(data_dir / "base" / "loop")

    with symlink_server.client() as http:
        cases = {
            "adapter entry": submit(http, TINY_BASE, "linked-adapter"),
            "file in adapter": submit(http, TINY_BASE, "inner-link"),
            "file in base": submit(http, "inner-link", TINY_ADAPTER),
            "loop entry": submit(http, "loop", TINY_ADAPTER),
        }
        listing = http.get("/base-models")
        health = http.get("/health")

    assert cases["adapter entry"].status_code == 400
    assert "resolves outside adapters/" in cases["adapter entry"].json()["detail"]
    assert cases["file in adapter"].status_code == 400
    assert f"contains {ADAPTER_WEIGHTS}" in cases["file in adapter"].json()["detail"]
    assert cases["file in base"].status_code == 400
    assert "contains tokenizer.json" in cases["file in base"].json()["detail"]
    assert cases["loop entry"].status_code == 400
    for response in cases.values():
        assert str(outside) not in response.json()["detail"]
    assert listing.status_code == 200
    assert "loop" not in [item["name"] for item in listing.json()]
    assert health.status_code == 200
    assert merged_entries(data_dir) == []


def test_symlink_inside_data_dir_merges(symlink_server):
    """The control for the test above: a link to another entry's file is allowed."""
    data_dir = symlink_server.data_dir
    adapter = data_dir / "adapters" / "shared-weights"
    adapter.mkdir()
    shutil.copy(data_dir / "adapters" / TINY_ADAPTER / "adapter_config.json", adapter)
    (adapter / ADAPTER_WEIGHTS).symlink_to(data_dir / "adapters" / TINY_ADAPTER / ADAPTER_WEIGHTS)

    with symlink_server.client() as http:
        response = submit(http, TINY_BASE, "shared-weights", name="shared")
        assert response.status_code == 202, response.text
        job = wait_for_job(http, response.json()["id"], FINISHED)

    assert job["status"] == "succeeded", job["error"]
    assert merged_entries(data_dir) == ["shared"]


def test_malformed_merge_report_still_lists(symlink_server):
    data_dir = symlink_server.data_dir
    merged = shutil.copytree(data_dir / "base" / TINY_BASE, data_dir / "merged" / "odd-report")
    (merged / "merge_report.json").write_text('{"merged_modules": 5, "numerical": [1]}')

    with symlink_server.client() as http:
        response = http.get("/merged-models")

    assert response.status_code == 200
    assert [item["name"] for item in response.json()] == ["odd-report"]
    assert response.json()[0]["report"] is None
    assert "ignored malformed merge report of merged/odd-report" in symlink_server.log()
