"""Helpers for service tests: a data directory with a tiny model, and `furina serve` processes.

- `build_data_dir(path)` writes base/tiny-llama (random Llama, byte-level tokenizer) and
  adapters/tiny-furina (a FURINA adapter with non-zero magnitudes and shared experts).
- `launch_server(data_dir, log_path, env)` starts `python -m furina.cli serve` on a free
  loopback port and waits for /health; `running_server` stops it afterwards.
- `wait_for_job` and `submit_merge` drive merge jobs over HTTP.
conftest.py wraps these in fixtures; import them in a test with `from service_support import ...`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from furina.adapter import FurinaAdapterConfig, save_adapter
from furina.checkpoint import checkpoint_fingerprint, load_causal_lm
from furina.inject import DEFAULT_TARGET_MODULES, adapter_state_dict, furina_layers, inject_furina
from furina.layer import FurinaHyperparameters
from furina.synthetic import write_random_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_BASE = "tiny-llama"
TINY_ADAPTER = "tiny-furina"
ADAPTER_HPARAMS = FurinaHyperparameters(
    r=2, lora_alpha=4.0, num_experts=3, num_shared_experts=1, top_k=1
)
# A cold start imports torch, transformers and the merger: about 5 s on 2 CPU cores.
STARTUP_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
LISTENING_LINE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
LOG_TAIL_LINES = 80
# Seconds each merge of `slow_server` waits per tensor: the tiny model has 20 tensors.
SLOW_MERGE_DELAY = 0.25


def write_tiny_adapter(base_dir: Path, adapter_dir: Path, seed: int = 0) -> Path:
    """Save a FURINA adapter for base_dir whose merge changes the model's outputs.

    A fresh FurinaLinear has zero magnitudes and a zero shared B, so it would change
    nothing: both are filled with random values here.
    """
    model = load_causal_lm(base_dir)
    inject_furina(model, ADAPTER_HPARAMS)
    generator = torch.Generator().manual_seed(seed)
    shared = ADAPTER_HPARAMS.num_shared_experts
    with torch.no_grad():
        for _, layer in furina_layers(model):
            magnitude = torch.randn(layer.furina_magnitude.shape, generator=generator)
            layer.furina_magnitude.copy_(0.1 * magnitude)
            shared_B = torch.randn(layer.furina_B[:shared].shape, generator=generator)
            layer.furina_B[:shared] = 0.05 * shared_B

    config = FurinaAdapterConfig(
        base_model_name_or_path=str(base_dir),
        base_model_fingerprint=checkpoint_fingerprint(base_dir),
        r=ADAPTER_HPARAMS.r,
        lora_alpha=ADAPTER_HPARAMS.lora_alpha,
        num_experts=ADAPTER_HPARAMS.num_experts,
        num_shared_experts=ADAPTER_HPARAMS.num_shared_experts,
        top_k=ADAPTER_HPARAMS.top_k,
        eps=ADAPTER_HPARAMS.eps,
        target_modules=list(DEFAULT_TARGET_MODULES),
        selection_loss_weight=0.01,
    )
    return save_adapter(adapter_dir, config, adapter_state_dict(model))


def build_data_dir(path: Path) -> Path:
    """Write a data directory with base/tiny-llama and adapters/tiny-furina; return it."""
    base_dir = write_random_llama(path / "base" / TINY_BASE, seed=0)
    write_tiny_adapter(base_dir, path / "adapters" / TINY_ADAPTER)
    (path / "merged").mkdir()
    return path


def copy_data_dir(template: Path, destination: Path) -> Path:
    shutil.copytree(template, destination)
    return destination


@dataclass
class ServerHandle:
    """A `furina serve` subprocess and where to reach it."""

    base_url: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **options) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30.0, **options)

    def stop(self) -> int:
        """Send SIGTERM (a graceful stop) and wait; SIGKILL when it does not exit in time.

        Returns the exit code: uvicorn re-raises SIGTERM after its graceful shutdown, so a
        clean stop ends with -SIGTERM.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """Send SIGKILL, as a crash would end the process, and wait for it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)


# Every server started by this session, for the log dump of failed tests.
STARTED_SERVERS: list[ServerHandle] = []


def launch_server(
    data_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> ServerHandle:
    """Start `furina serve` on a free loopback port and wait until /health returns 200.

    FURINA_* variables of the calling environment are dropped, so only `env` configures
    the server. Raises RuntimeError with the server log when it does not come up.
    """
    server_env = {key: value for key, value in os.environ.items() if not key.startswith("FURINA_")}
    server_env.update(env or {})
    command = [
        sys.executable, "-m", "furina.cli", "serve",
        "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir), "--log-level", "INFO",
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=server_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    handle = ServerHandle("", data_dir, process, log_path, dict(env or {}))
    STARTED_SERVERS.append(handle)
    try:
        handle.base_url = _wait_until_healthy(handle)
    except BaseException:
        handle.kill()
        raise
    return handle


def _wait_until_healthy(handle: ServerHandle) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    base_url = None
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"furina serve exited with code {handle.process.returncode}:\n{handle.log()}"
            )
        if base_url is None:
            match = LISTENING_LINE.search(handle.log())
            base_url = f"http://127.0.0.1:{match.group(1)}" if match else None
        elif _is_healthy(base_url):
            return base_url
        time.sleep(0.1)
    raise RuntimeError(f"furina serve not healthy after {STARTUP_TIMEOUT} s:\n{handle.log()}")


def _is_healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def running_server(
    data_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[ServerHandle]:
    handle = launch_server(data_dir, log_path, env)
    try:
        yield handle
    finally:
        handle.stop()


def wait_for_job(
    http: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60.0
) -> dict:
    """Poll GET /merge/{job_id} until its status is in statuses; return the job."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        response = http.get(f"/merge/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"merge job {job_id} not in {sorted(statuses)} after {timeout} s: {job}")


FINISHED = {"succeeded", "failed", "cancelled"}


def submit_merge(http: httpx.Client, name: str, **options) -> httpx.Response:
    body = {"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": name, **options}
    return http.post("/merge", json=body)


