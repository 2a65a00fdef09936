"""Generation under load: the bounded queue, 503 with Retry-After, memory, and disconnects.

The HTTP tests run one real `furina serve` with one generation slot and 8 queue places,
and drive it with bench/load_generate.py, the script behind docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from service_support import REPO_ROOT, ServerHandle, copy_data_dir, running_server

from furina.synthetic import write_random_llama
from service.app import create_app
from service.generation_slots import GenerationBusyError, GenerationSlots
from service.settings import Settings

MODEL = "base/tiny-llama"
# A wider, deeper random Llama (about 94 MB): 1500 tokens take over 10 s on 2 CPU cores,
# far longer than the disconnect takes to notice. The tiny model would finish first.
SLOW_MODEL = "base/slow-llama"
SLOW_MODEL_SHAPE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6}
CONCURRENCY = 1
QUEUE_SIZE = 8
CLIENTS = 32
# Long enough that the burst of 32 requests arrives while the first 9 still hold or wait.
BURST_NEW_TOKENS = 64
# A generation that would run for many seconds if the disconnect did not stop it.
LONG_NEW_TOKENS = 1500
# A leaked slot would make the next request wait this long and then get 503.
QUEUE_TIMEOUT = 20.0
# The server's RSS may grow this much during the burst: the tiny model's KV caches
# and buffers for 9 admitted requests need a few MiB.
MAX_RSS_GROWTH = 100 * 1024**2
LOAD_SCRIPT_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def load_server(data_dir_template, tmp_path_factory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("load-server")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    write_random_llama(data_dir / SLOW_MODEL, **SLOW_MODEL_SHAPE)
    env = {
        "FURINA_GENERATION_CONCURRENCY": str(CONCURRENCY),
        "FURINA_GENERATION_QUEUE_SIZE": str(QUEUE_SIZE),
        "FURINA_GENERATION_QUEUE_TIMEOUT_SECONDS": str(QUEUE_TIMEOUT),
        "FURINA_MAX_NEW_TOKENS_CAP": str(LONG_NEW_TOKENS),
    }
    with running_server(data_dir, root / "server.log", env) as handle:
        yield handle


def generated_tokens_total(http: httpx.Client) -> float:
    metrics = http.get("/metrics").text
    match = re.search(r"^furina_generated_tokens_total (\S+)$", metrics, re.MULTILINE)
    assert match, metrics
    return float(match.group(1))


def run_load_script(server: ServerHandle) -> dict:
    command = [
        sys.executable, "-m", "bench.load_generate",
        "--url", server.base_url, "--server-pid", str(server.process.pid),
        "--model", MODEL, "--clients", str(CLIENTS), "--requests", str(CLIENTS),
        "--max-new-tokens", str(BURST_NEW_TOKENS), "--retry-after-cap", "0",
        "--deadline", "120", "--json", "--no-docs",
    ]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LOAD_SCRIPT_TIMEOUT
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_burst_gets_response_or_503(load_server):
    results = run_load_script(load_server)
    statuses = results["statuses"]
    rss = results["server_rss_bytes"]

    assert results["requests"] == CLIENTS
    assert results["unanswered"] == 0
    assert set(statuses) <= {"200", "503"}
    # One generation runs and QUEUE_SIZE wait, and each of them gets a 200 response.
    assert statuses.get("200", 0) >= CONCURRENCY + QUEUE_SIZE
    assert statuses.get("503", 0) >= 1
    assert results["busy_without_retry_after"] == 0
    assert min(results["retry_after_s"]) >= 1
    assert rss["after"] - rss["before"] < MAX_RSS_GROWTH
    assert results["health_after"] == 200


def test_busy_response_shapes(data_dir):
    """Both API styles send 503 with Retry-After: {"detail"} here, OpenAI's error body on /v1."""
    settings = Settings(data_dir=data_dir, generation_concurrency=1, generation_queue_size=0)
    app = create_app(settings)
    # Take the only slot outside the app's event loop: acquire() does not wait for it.
    asyncio.run(app.state.generation_slots.acquire())

    with TestClient(app) as http:
        generate = http.post("/generate", json={"model": MODEL, "prompt": "Hi"})
        completion = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        unknown = http.post("/generate", json={"model": "base/missing", "prompt": "Hi"})

    assert generate.status_code == 503
    assert int(generate.headers["retry-after"]) >= 1
    assert "FURINA_GENERATION_QUEUE_SIZE" in generate.json()["detail"]
    assert completion.status_code == 503
    assert int(completion.headers["retry-after"]) >= 1
    assert completion.json()["error"]["type"] == "server_error"
    # An unknown model is reported at once, without a place in the queue.
    assert unknown.status_code == 404


def wait_until_idle(server: ServerHandle, timeout: float = 90.0) -> None:
    """Wait until a one-token request is admitted, so earlier generations have ended."""
    deadline = time.monotonic() + timeout
    with server.client() as http:
        while time.monotonic() < deadline:
            body = {"model": MODEL, "prompt": "Hi", "max_new_tokens": 1}
            if http.post("/generate", json=body).status_code == 200:
                return
            time.sleep(0.5)
    raise AssertionError(f"generation slots still busy after {timeout} s")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation(load_server, stream):
    wait_until_idle(load_server)
    request_id = f"disconnect-{uuid.uuid4().hex[:8]}"
    body = {"model": SLOW_MODEL, "prompt": "Hello", "max_new_tokens": LONG_NEW_TOKENS}
    body["stream"] = stream
    headers = {"X-Request-ID": request_id}
    with load_server.client() as http:
        tokens_before = generated_tokens_total(http)

    # Leave after the response headers (stream) or after a short read timeout (whole JSON).
    with httpx.Client(base_url=load_server.base_url, timeout=httpx.Timeout(30, read=0.5)) as http:
        if stream:
            with http.stream("POST", "/generate", json=body, headers=headers) as response:
                assert response.status_code == 200
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/generate", json=body, headers=headers)

    line = wait_for_log_line(load_server, request_id, "generated ")
    generated = int(re.search(r"generated (\d+) tokens", line).group(1))
    with load_server.client() as http:
        tokens_after = generated_tokens_total(http)
        short = {"model": MODEL, "prompt": "Hi", "max_new_tokens": 2}
        follow_up = http.post("/generate", json=short)

    assert "finish_reason cancelled" in line
    assert generated < LONG_NEW_TOKENS
    assert tokens_after - tokens_before == generated
    # The slot came back: with one slot, a leak would give this request 503.
    assert follow_up.status_code == 200


def wait_for_log_line(
    server: ServerHandle, request_id: str, text: str, timeout: float = 60.0
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if f"[{request_id}]" in line and text in line:
                return line
        time.sleep(0.2)
    raise AssertionError(f"no log line with [{request_id}] and {text!r} after {timeout} s")


# GenerationSlots in one event loop, without a server


def test_slots_reject_beyond_queue():
    async def scenario() -> tuple[GenerationBusyError, int, int]:
        slots = GenerationSlots(concurrency=1, queue_size=2, queue_timeout=30)
        first = await slots.acquire()
        waiters = [asyncio.create_task(slots.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(GenerationBusyError) as rejected:
            await slots.acquire()
        waiting = slots.waiting
        first.release()
        second = await waiters[0]
        second.release()
        (await waiters[1]).release()
        return rejected.value, waiting, slots.running

    error, waiting, running_after = asyncio.run(scenario())

    assert error.status_code == 503
    assert int(error.headers["Retry-After"]) >= 1
    assert "1 generations running and 2 waiting" in error.detail
    assert waiting == 2
    assert running_after == 0


def test_slots_queue_timeout():
    async def scenario() -> GenerationBusyError:
        slots = GenerationSlots(concurrency=1, queue_size=4, queue_timeout=0.05)
        await slots.acquire()
        with pytest.raises(GenerationBusyError) as timed_out:
            await slots.acquire()
        assert slots.waiting == 0
        return timed_out.value

    error = asyncio.run(scenario())

    assert "no generation slot became free within 0.05 s" in error.detail
    assert "Retry-After" in error.headers


def test_slot_release_idempotent():
    async def scenario() -> int:
        slots = GenerationSlots(concurrency=2, queue_size=0, queue_timeout=1)
        slot = await slots.acquire()
        slot.release()
        slot.release()
        # Two fresh slots are free again, and only two: a double release would add a third.
        held = [await slots.acquire(), await slots.acquire()]
        with pytest.raises(GenerationBusyError):
            await slots.acquire()
        return len(held)

    assert asyncio.run(scenario()) == 2
