"""Latency measurement: interleaving, exact token counts, greedy correctness, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from furina.synthetic import random_llama
from merger.latency import greedy_tokens, measure_latency, percentile

PROMPT_IDS = torch.tensor([[5, 17, 99, 3, 250, 42]])


class CallRecorder(nn.Module):
    """Wraps a causal LM and records (name, sequence length) of every forward call."""

    def __init__(self, name: str, model: nn.Module, calls: list[tuple[str, int]]) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.calls = calls

    def forward(self, input_ids: torch.Tensor, **kwargs):
        self.calls.append((self.name, input_ids.shape[1]))
        return self.model(input_ids=input_ids, **kwargs)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {"base": random_llama(seed=0), "other": random_llama(seed=1)}


def test_sample_counts_and_decode_formula(models: dict[str, nn.Module]):
    results = measure_latency(models, PROMPT_IDS, new_tokens=5, repeats=3, warmup=1)

    assert set(results) == {"base", "other"}
    for stats in results.values():
        assert len(stats.total_time_s) == 3
        assert stats.prompt_tokens == PROMPT_IDS.shape[1]
        for first, decode, total in zip(
            stats.time_to_first_token_s,
            stats.decode_time_per_token_s,
            stats.total_time_s,
            strict=True,
        ):
            assert 0 < first < total
            assert decode == pytest.approx((total - first) / 4)


def test_ratios_to_reference(models: dict[str, nn.Module]):
    results = measure_latency(models, PROMPT_IDS, new_tokens=3, repeats=3, warmup=0)
    base, other = results["base"], results["other"]

    assert base.ratio_to_reference["total_time_s"] == 1.0
    expected = other.median("total_time_s") / base.median("total_time_s")
    assert other.ratio_to_reference["total_time_s"] == pytest.approx(expected)
    assert (
        measure_latency(models, PROMPT_IDS, 2, 1, reference=None)["base"].ratio_to_reference is None
    )


def test_runs_interleaved_with_exact_steps(models: dict[str, nn.Module]):
    calls: list[tuple[str, int]] = []
    recorded = {name: CallRecorder(name, model, calls) for name, model in models.items()}
    measure_latency(recorded, PROMPT_IDS, new_tokens=4, repeats=2, warmup=1)

    prefill_order = [name for name, length in calls if length > 1]
    assert prefill_order == ["base", "other"] * 3
    one_run = [("base", PROMPT_IDS.shape[1])] + [("base", 1)] * 3
    assert calls[:4] == one_run


def test_greedy_tokens_match_generate(models: dict[str, nn.Module]):
    model = models["base"]
    ours = greedy_tokens(model, PROMPT_IDS, 8)
    generated = model.generate(
        PROMPT_IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )

    assert ours.shape == (1, 8)
    assert torch.equal(ours, generated[:, PROMPT_IDS.shape[1] :])


def test_batched_left_padding_matches_generate(models: dict[str, nn.Module]):
    model = models["other"]
    input_ids = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ours = greedy_tokens(model, input_ids, 6, attention_mask=attention_mask)
    generated = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )

    assert torch.equal(ours, generated[:, input_ids.shape[1] :])
    alone = greedy_tokens(model, input_ids[:1, 2:], 6)
    assert torch.equal(ours[:1], alone)


def test_batch_counts_tokens_per_second(models: dict[str, nn.Module]):
    batch = PROMPT_IDS.repeat(3, 1)
    stats = measure_latency({"base": models["base"]}, batch, new_tokens=2, repeats=2, warmup=0)[
        "base"
    ]

    assert stats.batch_size == 3
    for rate, total in zip(stats.tokens_per_second, stats.total_time_s, strict=True):
        assert rate == pytest.approx(3 * 2 / total)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"new_tokens": 1}, "new_tokens must be at least 2"),
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"warmup": -1}, "warmup must be 0 or more"),
        ({"reference": "missing"}, "reference model 'missing'"),
    ],
)
def test_invalid_arguments(models: dict[str, nn.Module], arguments: dict, message: str):
    options = {"new_tokens": 3, "repeats": 1, **arguments}
    with pytest.raises(ValueError, match=message):
        measure_latency(models, PROMPT_IDS, **options)


def test_percentile_matches_numpy():
    generator = np.random.default_rng(0)
    for size in (1, 2, 5, 10):
        samples = generator.random(size).tolist()
        for percent in (50, 90):
            assert percentile(samples, percent) == pytest.approx(np.percentile(samples, percent))
