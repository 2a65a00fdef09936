"""POST /latency/compare on the real server with the tiny model."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from test_generate import write_varied_merged_model

from service.routers.latency import VARIANTS

METRICS = ("time_to_first_token", "decode_time_per_token", "total", "tokens_per_second")
SMALL = {"prompt_tokens": 8, "new_tokens": 4, "repeats": 3}


@pytest.fixture(scope="module")
def model_name(server) -> str:
    name = f"latency-{uuid.uuid4().hex[:8]}"
    write_varied_merged_model(server.data_dir, name)
    return name


def compare(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/latency/compare", json=body, timeout=120.0)


@pytest.fixture(scope="module")
def comparison(server, model_name) -> dict:
    """One comparison of all four variants, shared by the tests that only read it."""
    with server.client() as client:
        response = compare(client, model=model_name, **SMALL)
    assert response.status_code == 200, response.text
    return response.json()


def test_compare_all_variants(comparison, model_name):
    result = comparison

    assert list(result["variants"]) == list(VARIANTS)
    assert (result["prompt_tokens"], result["new_tokens"], result["repeats"]) == (8, 4, 3)
    assert result["base_model"] == model_name
    assert result["adapter"] == model_name
    for name, variant in result["variants"].items():
        for metric in METRICS:
            assert 0 < variant[metric]["median"] <= variant[metric]["p90"], (name, metric)
        assert set(variant["ratio_to_base"]) == set(METRICS)
        assert all(ratio > 0 for ratio in variant["ratio_to_base"].values())
    assert result["variants"]["base"]["ratio_to_base"] == {metric: 1.0 for metric in METRICS}


def test_compare_reports_consistent_rates(comparison):
    for variant in comparison["variants"].values():
        # A run's rate is new_tokens / total. With an odd number of repeats the median
        # rate comes from the median run, because 1/x is monotonic.
        expected = SMALL["new_tokens"] / variant["total"]["median"]
        assert variant["tokens_per_second"]["median"] == pytest.approx(expected)
        assert variant["time_to_first_token"]["median"] < variant["total"]["median"]


def test_compare_describes_machine_and_baseline(comparison):
    result = comparison

    machine = result["machine"]
    assert machine["cpu_model"]
    assert machine["torch_threads"] >= 1
    assert machine["torch_version"].startswith("2.")
    moe_lora = result["moe_lora"]
    assert moe_lora["weights"] == "random"
    # The tiny adapter has 3 experts of rank 2, top_k 1, on every projection.
    assert (moe_lora["num_experts"], moe_lora["r"], moe_lora["top_k"]) == (3, 2, 1)
    assert moe_lora["mlp_expert_modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert any("random weights" in note for note in result["notes"])


def test_compare_without_base_has_no_ratios(client, model_name):
    response = compare(client, model=model_name, **SMALL, variants=["merged", "furina_unmerged"])

    result = response.json()
    assert list(result["variants"]) == ["merged", "furina_unmerged"]
    assert all(variant["ratio_to_base"] is None for variant in result["variants"].values())
    assert result["moe_lora"] is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt_tokens": 513}, "cap of 512 (FURINA_LATENCY_MAX_PROMPT_TOKENS)"),
        ({"new_tokens": 129}, "cap of 128 (FURINA_LATENCY_MAX_NEW_TOKENS)"),
        ({"repeats": 11}, "cap of 10 (FURINA_LATENCY_MAX_REPEATS)"),
        (
            {"prompt_tokens": 500, "new_tokens": 100, "repeats": 10},
            "budget of 20000 (FURINA_LATENCY_MAX_TOTAL_TOKENS)",
        ),
        ({"new_tokens": 1}, "new_tokens"),
        ({"variants": []}, "variants"),
        ({"variants": ["merged", "merged"]}, "duplicates"),
        ({"variants": ["lora"]}, "variants"),
    ],
)
def test_compare_rejects_invalid_sizes(client, model_name, body, message):
    response = compare(client, model=model_name, **body)

    assert response.status_code == 422
    assert message in str(response.json()["detail"])


def test_compare_base_model_rejected(client):
    response = compare(client, model="base/tiny-llama", **SMALL)

    assert response.status_code == 422
    assert "is a base model" in response.json()["detail"]


def test_compare_unknown_model_not_found(client):
    response = compare(client, model="no-such-model", **SMALL)

    assert response.status_code == 404


def test_second_comparison_conflicts(server, client, model_name):
    first_body = {"model": model_name, "prompt_tokens": 32, "new_tokens": 16, "repeats": 3}
    first: dict = {}
    log_before = len(server.log())

    def run_first() -> None:
        with server.client() as other:
            first["response"] = compare(other, **first_body)

    thread = threading.Thread(target=run_first)
    thread.start()
    started = f"latency comparison of {model_name}: variants"
    deadline = time.monotonic() + 60
    while started not in server.log()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.02)

    second = compare(client, model=model_name, **SMALL)
    thread.join(timeout=120)

    assert second.status_code == 409
    assert "another latency comparison is running" in second.json()["detail"]
    assert first["response"].status_code == 200
