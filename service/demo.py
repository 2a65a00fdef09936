"""`furina run-demo`: the whole product on the real SmolLM2 base, from a fresh clone.

Steps: prepare the base from the packaged GGUF, write the date demo data, train the demo
adapter (each skipped when its output exists), start `furina serve`, merge through
`POST /merge`, print a generation and the latency comparison, then keep serving until
Ctrl-C. Every model step after training goes through the HTTP API, as a user's would.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from furina.base_model import DEFAULT_BASE_NAME, prepare_base
from furina.data import default_data_dir

DEMO_NAME = "demo"
DEMO_STEPS = 40
DEMO_LEARNING_RATE = 2e-4
DEMO_QUESTION = "Convert to ISO 8601: July 4, 1976"
SERVER_START_TIMEOUT_SECONDS = 120.0
MERGE_TIMEOUT_SECONDS = 1800.0


class DemoRun:
    """Runs the demo steps against one data directory and records each step's duration."""

    def __init__(self, data_dir: Path, host: str, port: int, train_steps: int) -> None:
        self.data_dir = data_dir
        self.base_url = f"http://{host}:{port}"
        self.host, self.port = host, port
        self.train_steps = train_steps
        self.step_seconds: dict[str, float] = {}
        self.server: subprocess.Popen | None = None
        self.log_path = data_dir / "logs" / "serve.log"

    def timed(self, name: str, step: Callable[[], Any]) -> Any:
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        result = step()
        self.step_seconds[name] = time.perf_counter() - started
        print(f"== {name}: {self.step_seconds[name]:.1f} s", flush=True)
        return result

    # Offline preparation: plain library calls, skipped when their output exists.

    def prepare_base(self) -> None:
        base_dir = self.data_dir / "base" / DEFAULT_BASE_NAME
        if (base_dir / "config.json").is_file():
            print(f"base model already prepared in {base_dir}")
            return
        prepare_base(base_dir)

    def write_demo_data(self) -> None:
        from furina.demo_data import write_demo_data

        dataset_dir = self.data_dir / "datasets" / DEMO_NAME
        if (dataset_dir / "eval.jsonl").is_file():
            print(f"demo data already in {dataset_dir}")
            return
        write_demo_data(dataset_dir)

    def train_adapter(self) -> None:
        from furina.train import TrainingConfig, run_training

        adapter_dir = self.data_dir / "adapters" / DEMO_NAME
        if (adapter_dir / "adapter_config.json").is_file():
            print(f"demo adapter already trained in {adapter_dir}")
            return
        config = TrainingConfig(steps=self.train_steps, learning_rate=DEMO_LEARNING_RATE)
        run_training(
            self.data_dir / "base" / DEFAULT_BASE_NAME,
            self.data_dir / "datasets" / DEMO_NAME / "train.jsonl",
            adapter_dir,
            config,
        )

    # Everything after this point goes through the HTTP API.

    def start_server(self) -> None:
        command = [
            sys.executable, "-m", "furina.cli", "--log-level", "INFO", "serve",
            "--host", self.host, "--port", str(self.port), "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        # The service logs every request; a file keeps them from burying the demo's output.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        print(f"service log: {self.log_path}")
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(
                    f"furina serve exited with code {self.server.returncode}: is port "
                    f"{self.port} already in use? Pass --port to choose another, and see "
                    f"{self.log_path}"
                )
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    print(f"service is up at {self.base_url}")
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"service did not respond to /health within {SERVER_START_TIMEOUT_SECONDS} s"
        )

    def merge(self, client: httpx.Client) -> None:
        if (self.data_dir / "merged" / DEMO_NAME / "config.json").is_file():
            print(
                f"merged model {DEMO_NAME!r} exists: delete "
                f"{self.data_dir / 'merged' / DEMO_NAME} to merge again"
            )
            return
        request = {
            "base_model": DEFAULT_BASE_NAME,
            "adapter": DEMO_NAME,
            "name": DEMO_NAME,
            "verify": True,
        }
        response = client.post("/merge", json=request)
        _raise_for_status(response)
        location = response.headers["location"]
        print(f"POST /merge -> {response.status_code}, job {location}")

        deadline = time.monotonic() + MERGE_TIMEOUT_SECONDS
        last_progress = -1.0
        while time.monotonic() < deadline:
            job = client.get(location).json()
            if job["progress"] - last_progress >= 0.1 or job["status"] not in ("queued", "running"):
                print(f"  {job['status']:<9} progress {job['progress']:.0%}", flush=True)
                last_progress = job["progress"]
            if job["status"] == "succeeded":
                _print_report_summary(job.get("report") or {})
                return
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"merge job {job['status']}: {job.get('error')}")
            time.sleep(1.0)
        raise TimeoutError(f"merge did not finish within {MERGE_TIMEOUT_SECONDS} s")

    def generate(self, client: httpx.Client) -> None:
        for model in (f"base/{DEFAULT_BASE_NAME}", DEMO_NAME):
            request = {
                "model": model,
                "messages": [{"role": "user", "content": DEMO_QUESTION}],
                "max_new_tokens": 24,
                "temperature": 0,
            }
            response = client.post("/generate", json=request)
            _raise_for_status(response)
            body = response.json()
            timings = body["timings"]
            print(
                f"{model:>28}: {body['text']!r}  ({body['usage']['completion_tokens']} tokens, "
                f"first token {timings['time_to_first_token'] * 1000:.0f} ms, "
                f"{timings['tokens_per_second']:.1f} tokens/s)"
            )

    def compare_latency(self, client: httpx.Client) -> None:
        request = {"model": DEMO_NAME, "prompt_tokens": 100, "new_tokens": 32, "repeats": 3}
        response = client.post("/latency/compare", json=request, timeout=1800.0)
        _raise_for_status(response)
        print_latency_table(response.json())

    def serve_forever(self) -> None:
        print(
            f"\nServing on {self.base_url} (web page: {self.base_url}/, API docs: "
            f"{self.base_url}/docs, log: {self.log_path}). Press Ctrl-C to stop."
        )
        assert self.server is not None
        self.server.wait()

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()


def print_latency_table(result: dict[str, Any]) -> None:
    """Print the latency comparison as an aligned table of medians and ratios to base."""
    print(
        f"{'variant':<20} {'first token ms':>15} {'per token ms':>13} {'total s':>8} {'x base':>7}"
    )
    for name, stats in result["variants"].items():
        print(
            f"{name:<20} {stats['time_to_first_token']['median'] * 1000:>15.1f} "
            f"{stats['decode_time_per_token']['median'] * 1000:>13.1f} "
            f"{stats['total']['median']:>8.2f} "
            f"{(stats['ratio_to_base'] or {}).get('total', 0):>7.2f}"
        )
    for note in result.get("notes", []):
        print(f"note: {note}")


def _print_report_summary(report: dict[str, Any]) -> None:
    structure = report.get("structure") or {}
    numerical = report.get("numerical") or {}
    print(f"  structure identical to base: {structure.get('passed')}")
    if numerical:
        print(
            "  max relative logit difference merged vs unmerged: "
            f"{numerical.get('max_rel_logit_diff_merged_vs_unmerged'):.2e}, "
            f"greedy outputs identical: {numerical.get('greedy_identical')}"
        )


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} failed with "
            f"{response.status_code}: {response.text}"
        )


def run_demo(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or default_data_dir()).resolve()
    demo = DemoRun(data_dir, args.host, args.port, args.train_steps)
    try:
        demo.timed("prepare base model", demo.prepare_base)
        demo.timed("write demo data", demo.write_demo_data)
        demo.timed("train demo adapter", demo.train_adapter)
        demo.timed("start service", demo.start_server)
        with httpx.Client(base_url=demo.base_url, timeout=600.0, headers=_auth_headers()) as client:
            demo.timed("merge through POST /merge", lambda: demo.merge(client))
            demo.timed("generate through POST /generate", lambda: demo.generate(client))
            demo.timed("latency comparison", lambda: demo.compare_latency(client))
        print("\nStep durations:")
        for name, seconds in demo.step_seconds.items():
            print(f"  {name:<34} {seconds:8.1f} s")
        demo.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        demo.stop_server()
    return 0


def _auth_headers() -> dict[str, str]:
    api_key = os.environ.get("FURINA_API_KEY")
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run-demo", help="prepare, train, merge through the API and serve the demo model"
    )
    parser.add_argument(
        "--data-dir", default=None, help="data directory (default: $FURINA_DATA_DIR or ./data)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the service binds (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="service port (default 8000)")
    parser.add_argument(
        "--train-steps", type=int, default=DEMO_STEPS, help="training steps of the demo adapter"
    )
    parser.set_defaults(handler=run_demo)
