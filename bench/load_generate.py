"""Load-test POST /generate: concurrent clients against `furina serve` on loopback.

Without --url, the script writes a tiny random Llama (2 layers, hidden size 64) into a
temporary data directory, starts `furina serve` on 127.0.0.1 with the generation queue
settings given here, and stops it at the end. With --url it loads a server already
running on this machine; any host other than loopback is rejected.

Each of --clients clients sends requests one after another until --requests requests
have been sent in all or --deadline seconds have passed. After a 503 a client waits
the server's Retry-After, capped at --retry-after-cap seconds, as a polite client
would. Latency is the time from sending a request to reading its whole response.
Resident memory (VmRSS) of the server is read from /proc before and after the load,
so it needs the server's process id: the started server's, or --server-pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench import common

NAME = "load_generate"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
TINY_MODEL = "base/tiny-llama"
PROMPT = "The quick brown fox"
LISTENING_LINE = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
SERVER_START_TIMEOUT = 120.0
# Seconds one request may take before it counts as unanswered.
REQUEST_TIMEOUT = 300.0


@dataclass
class RequestRecord:
    """Outcome of one request. status 0: no HTTP response (connection error or timeout)."""

    status: int
    seconds: float
    completion_tokens: int = 0
    retry_after: int | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", help="base URL of a running server on loopback (default: start one)"
    )
    parser.add_argument("--server-pid", type=int, help="process id of the --url server, for RSS")
    parser.add_argument("--model", default=TINY_MODEL, help=f"model id (default {TINY_MODEL})")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--requests", type=int, default=256, help="requests sent in all (default 256)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="max_new_tokens per request (default 32)"
    )
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="seconds after which clients stop sending"
    )
    parser.add_argument(
        "--retry-after-cap",
        type=float,
        default=2.0,
        help="maximum seconds a client waits after a 503 (default 2, and 0 retries at once)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="FURINA_GENERATION_CONCURRENCY of the started server (default 1)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=8,
        help="FURINA_GENERATION_QUEUE_SIZE of the started server (default 8)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="FURINA_GENERATION_QUEUE_TIMEOUT_SECONDS of the started server",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="write neither bench/results nor docs/benchmarks.md (never written with --url)",
    )
    return parser.parse_args(argv)


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(
            f"--url must point at this machine (127.0.0.1, localhost or ::1), got {host!r}"
        )


# Load


async def run_load(
    url: str,
    model: str,
    clients: int,
    requests: int,
    max_new_tokens: int,
    deadline: float,
    retry_after_cap: float,
) -> tuple[list[RequestRecord], float]:
    """Send `requests` requests from `clients` concurrent clients; return records and wall time."""
    body = {"model": model, "prompt": PROMPT, "max_new_tokens": max_new_tokens}
    remaining = requests
    records: list[RequestRecord] = []
    stop_at = time.monotonic() + deadline
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < stop_at:
            remaining -= 1
            record = await send(http, body)
            records.append(record)
            if record.retry_after is not None and retry_after_cap > 0:
                await asyncio.sleep(min(record.retry_after, retry_after_cap))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return records, time.perf_counter() - started


async def send(http: httpx.AsyncClient, body: dict) -> RequestRecord:
    started = time.perf_counter()
    try:
        response = await http.post("/generate", json=body)
    except httpx.TransportError:
        return RequestRecord(status=0, seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if response.status_code == 200:
        tokens = response.json()["usage"]["completion_tokens"]
        return RequestRecord(200, seconds, completion_tokens=tokens)
    retry_after = response.headers.get("retry-after")
    return RequestRecord(
        response.status_code, seconds, retry_after=int(retry_after) if retry_after else None
    )


def percentile(samples: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile: the smallest sample with at least fraction of samples <= it."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(records: list[RequestRecord], wall_seconds: float) -> dict:
    ok = [record for record in records if record.status == 200]
    busy = [record for record in records if record.status == 503]
    latencies = [record.seconds for record in ok]
    statuses: dict[str, int] = {}
    for record in records:
        statuses[str(record.status)] = statuses.get(str(record.status), 0) + 1
    return {
        "requests": len(records),
        "statuses": statuses,
        "unanswered": statuses.get("0", 0),
        "ok_latency_s": {
            "p50": percentile(latencies, 0.50),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies, default=None),
        },
        "busy_latency_s": {"p50": percentile([r.seconds for r in busy], 0.50)},
        "retry_after_s": sorted({r.retry_after for r in busy if r.retry_after is not None}),
        "retry_after_median_s": percentile(
            [r.retry_after for r in busy if r.retry_after is not None], 0.50
        ),
        "busy_without_retry_after": sum(1 for r in busy if r.retry_after is None),
        "throughput_requests_per_s": len(ok) / wall_seconds,
        "throughput_tokens_per_s": sum(r.completion_tokens for r in ok) / wall_seconds,
        "load_wall_s": wall_seconds,
    }


# Server


def rss_bytes(pid: int | None, field: str = "VmRSS") -> int | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def start_server(
    data_dir: Path, log_path: Path, args: argparse.Namespace
) -> tuple[subprocess.Popen, str]:
    """Start `furina serve` on a free loopback port; return the process and its base URL."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FURINA_")}
    env.update(
        FURINA_GENERATION_CONCURRENCY=str(args.concurrency),
        FURINA_GENERATION_QUEUE_SIZE=str(args.queue_size),
        FURINA_GENERATION_QUEUE_TIMEOUT_SECONDS=str(args.queue_timeout),
        FURINA_MAX_NEW_TOKENS_CAP=str(max(args.max_new_tokens, 1)),
    )
    command = [
        sys.executable,
        "-m",
        "furina.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=common.REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        match = LISTENING_LINE.search(log_path.read_text(errors="replace"))
        if match and _healthy(match.group(1)):
            return process, match.group(1)
        time.sleep(0.2)
    stop_server(process)
    raise SystemExit(f"furina serve did not come up:\n{log_path.read_text(errors='replace')}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(url: str, pid: int | None, args: argparse.Namespace) -> dict:
    """Warm the model up, then run the load and read the server's memory around it."""
    warmup = httpx.post(
        f"{url}/generate",
        json={"model": args.model, "prompt": PROMPT, "max_new_tokens": args.max_new_tokens},
        timeout=REQUEST_TIMEOUT,
    )
    warmup.raise_for_status()
    rss_before = rss_bytes(pid)
    records, wall = asyncio.run(
        run_load(
            url,
            args.model,
            args.clients,
            args.requests,
            args.max_new_tokens,
            args.deadline,
            args.retry_after_cap,
        )
    )
    results = summarize(records, wall)
    results["server_rss_bytes"] = {
        "before": rss_before,
        "after": rss_bytes(pid),
        "peak": rss_bytes(pid, "VmHWM"),
    }
    results["health_after"] = httpx.get(f"{url}/health", timeout=10).status_code
    results["records"] = [asdict(record) for record in records]
    return results


def run(args: argparse.Namespace) -> dict:
    settings = {
        "clients": args.clients,
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "retry_after_cap_s": args.retry_after_cap,
        "model": args.model,
    }
    if args.url:
        require_loopback(args.url)
        return {"settings": settings, **measure(args.url, args.server_pid, args)}

    from furina.synthetic import write_random_llama

    settings.update(
        concurrency=args.concurrency, queue_size=args.queue_size, queue_timeout_s=args.queue_timeout
    )
    with tempfile.TemporaryDirectory(prefix="furina-load-") as temporary:
        data_dir = Path(temporary) / "data"
        write_random_llama(data_dir / "base" / "tiny-llama", seed=0)
        process, url = start_server(data_dir, Path(temporary) / "server.log", args)
        try:
            return {"settings": settings, **measure(url, process.pid, args)}
        finally:
            stop_server(process)


# Report


def docs_markdown(results: dict) -> str:
    settings = results["settings"]
    latency = results["ok_latency_s"]
    rss = results["server_rss_bytes"]
    mib = 1024**2
    sent = results["retry_after_s"]
    retry_after = "none"
    if sent:
        retry_after = f"{min(sent)} to {max(sent)} (median {results['retry_after_median_s']})"
    lines = [
        "## Generation under load",
        "",
        f"{settings['clients']} concurrent clients send {settings['requests']} POST /generate "
        f"requests in all to `furina serve` on 127.0.0.1 (model {settings['model']}: a random "
        f"Llama with 2 layers and hidden size 64, {settings['max_new_tokens']} new tokens per "
        "request, greedy). The server runs "
        f"{settings.get('concurrency', '?')} generation at a time with "
        f"{settings.get('queue_size', '?')} queued (FURINA_GENERATION_CONCURRENCY, "
        "FURINA_GENERATION_QUEUE_SIZE); further requests get 503 with Retry-After, and a "
        f"client waits that long, at most {settings['retry_after_cap_s']:g} s, before its "
        "next request. Latency is send to last byte; throughput counts 200 responses only.",
        "",
        "| responses | 200 | 503 | unanswered | p50 latency of 200 (s) | p99 latency of 200 (s) "
        "| requests/s | tokens/s | server RSS before / after / peak (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {results['requests']} | {results['statuses'].get('200', 0)} "
        f"| {results['statuses'].get('503', 0)} | {results['unanswered']} "
        f"| {latency['p50']:.3f} | {latency['p99']:.3f} "
        f"| {results['throughput_requests_per_s']:.1f} | {results['throughput_tokens_per_s']:.0f} "
        f"| {rss['before'] / mib:.0f} / {rss['after'] / mib:.0f} / {rss['peak'] / mib:.0f} |",
        "",
        f"Retry-After values sent: {retry_after} s. Latencies on a 2-core machine shared with "
        "other jobs are noisy, so the numbers this benchmark guards are the count of "
        "unanswered requests (0) and the server's RSS.",
        "",
        *common.environment_lines(results),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    results = run(args)
    results.update(
        machine=common.machine_info(),
        versions=common.package_versions(),
        command=common.command_line(),
        started=datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M UTC"),
        wall_seconds=time.time() - started,
    )
    if args.json:
        print(json.dumps(results))
    else:
        summary = {key: value for key, value in results.items() if key != "records"}
        print(json.dumps(summary, indent=2))
    # The page describes the server this script starts; a --url server's settings are unknown.
    if not args.no_docs and not args.url:
        common.write_results(NAME, results)
        common.update_docs_block(NAME, docs_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
