"""Expert selection loss: hand-computed L_div and L_bal, token masks and routed strengths.

Definitions (furina/selection_loss.py): p_i = g_i / sum_j g_j over the N routed experts,
L_div = mean over tokens of 1 - (sum of the top_k largest p_i), and
L_bal = N * sum_i F_i * P_i with F_i the fraction of tokens whose top-k contains
expert i and P_i the mean of p_i over tokens.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from furina.inject import furina_layers, inject_furina, set_selection_tracking
from furina.layer import FurinaHyperparameters, FurinaLinear
from furina.selection_loss import collect_selection_loss, selection_loss_terms
from furina.synthetic import random_llama

EXACT = dict(rtol=1e-12, atol=1e-12)

# Three tokens over three experts. Rows sum to 10, so p = g / 10:
# token 0: p = [0.6, 0.3, 0.1], token 1: p = [0.125, 0.25, 0.625], token 2 below.
THREE_TOKENS_TOP2 = [[6.0, 3.0, 1.0], [1.0, 2.0, 5.0], [4.0, 5.0, 1.0]]
THREE_TOKENS_TOP1 = [[6.0, 3.0, 1.0], [1.0, 2.0, 5.0], [5.0, 4.0, 1.0]]


def scalar(value: torch.Tensor) -> float:
    return value.item()


def test_uniform_strengths() -> None:
    strengths = torch.ones(3, 4, dtype=torch.float64)

    terms = selection_loss_terms(strengths, top_k=2)

    # p_i = 1/4: L_div = 1 - 2/4. F sums to top_k over experts and P_i = 1/4, so
    # L_bal = 4 * (1/4) * 2 = 2 = top_k, whichever tied experts topk picks.
    assert scalar(terms.divergence) == pytest.approx(0.5, abs=1e-12)
    assert scalar(terms.balance) == pytest.approx(2.0, abs=1e-12)
    assert scalar(terms.total) == pytest.approx(2.5, abs=1e-12)


def test_one_hot_strengths() -> None:
    strengths = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64)

    terms = selection_loss_terms(strengths, top_k=2)

    # p = [1, 0, 0, 0]: the top 2 carry everything, so L_div = 0. P = [1, 0, 0, 0]
    # and F_0 = 1, so L_bal = 4 * 1 * 1 = N: the collapse the term penalises.
    assert scalar(terms.divergence) == pytest.approx(0.0, abs=1e-12)
    assert scalar(terms.balance) == pytest.approx(4.0, abs=1e-12)


def test_three_tokens_top2() -> None:
    strengths = torch.tensor(THREE_TOKENS_TOP2, dtype=torch.float64)

    terms = selection_loss_terms(strengths, top_k=2)

    # token 2: p = [0.4, 0.5, 0.1]. Top-2 mass per token: 0.9, 0.875, 0.9.
    # L_div = (0.1 + 0.125 + 0.1) / 3.
    # P = [1.125, 1.05, 0.825] / 3 and F = [2/3, 1, 1/3].
    # L_bal = 3 * (2/3 * 0.375 + 1 * 0.35 + 1/3 * 0.275) = 2.075.
    assert scalar(terms.divergence) == pytest.approx(0.325 / 3, abs=1e-12)
    assert scalar(terms.balance) == pytest.approx(2.075, abs=1e-12)


def test_three_tokens_top1() -> None:
    strengths = torch.tensor(THREE_TOKENS_TOP1, dtype=torch.float64)

    terms = selection_loss_terms(strengths, top_k=1)

    # token 2: p = [0.5, 0.4, 0.1]. Top-1 mass per token: 0.6, 0.625, 0.5.
    # L_div = (0.4 + 0.375 + 0.5) / 3 = 0.425.
    # P = [1.225, 0.95, 0.825] / 3 and F = [2/3, 0, 1/3].
    # L_bal = 3 * (2/3 * 1.225/3 + 1/3 * 0.825/3) = 3.275 / 3.
    assert scalar(terms.divergence) == pytest.approx(0.425, abs=1e-12)
    assert scalar(terms.balance) == pytest.approx(3.275 / 3, abs=1e-12)


def test_scaling_strengths_changes_nothing() -> None:
    strengths = torch.tensor(THREE_TOKENS_TOP2, dtype=torch.float64)

    expected = selection_loss_terms(strengths, top_k=2)
    scaled = selection_loss_terms(strengths * 37.0, top_k=2)

    torch.testing.assert_close(scaled.divergence, expected.divergence, **EXACT)
    torch.testing.assert_close(scaled.balance, expected.balance, **EXACT)


def test_token_mask_drops_tokens() -> None:
    real_tokens = torch.tensor(THREE_TOKENS_TOP2, dtype=torch.float64)
    padding_row = torch.tensor([[100.0, 0.001, 0.001]], dtype=torch.float64)
    strengths = torch.cat([real_tokens[:2], padding_row, real_tokens[2:]])  # [4, 3]
    token_mask = torch.tensor([True, True, False, True])

    masked = selection_loss_terms(strengths, top_k=2, token_mask=token_mask)
    unmasked = selection_loss_terms(strengths, top_k=2)

    assert scalar(masked.divergence) == pytest.approx(0.325 / 3, abs=1e-12)
    assert scalar(masked.balance) == pytest.approx(2.075, abs=1e-12)
    assert scalar(unmasked.balance) != pytest.approx(2.075, abs=1e-3)


def test_integer_token_mask_acts_as_boolean() -> None:
    # An attention mask is int64 0/1. It must select tokens, not index rows.
    strengths = torch.tensor(THREE_TOKENS_TOP2 + [[100.0, 0.001, 0.001]], dtype=torch.float64)
    attention_mask = torch.tensor([1, 1, 1, 0])

    terms = selection_loss_terms(strengths, top_k=2, token_mask=attention_mask)

    assert scalar(terms.balance) == pytest.approx(2.075, abs=1e-12)


def test_all_tokens_masked_gives_zero() -> None:
    strengths = torch.ones(3, 4, requires_grad=True)

    terms = selection_loss_terms(strengths, top_k=2, token_mask=torch.zeros(3, dtype=torch.bool))
    terms.total.backward()

    assert scalar(terms.divergence) == 0.0
    assert scalar(terms.balance) == 0.0
    assert torch.equal(strengths.grad, torch.zeros(3, 4))


def tracked_layer(hparams: FurinaHyperparameters, seed: int = 0) -> FurinaLinear:
    torch.manual_seed(seed)
    layer = FurinaLinear(nn.Linear(12, 10), hparams).double()
    with torch.no_grad():
        layer.furina_B.normal_()
        layer.furina_magnitude.uniform_(0.5, 2.0)
    layer.track_selection = True
    return layer


@pytest.mark.parametrize("num_shared", [0, 1, 2])
def test_routed_strengths_match_direct_norms(num_shared: int) -> None:
    hparams = FurinaHyperparameters(r=3, num_experts=5, num_shared_experts=num_shared, top_k=2)
    layer = tracked_layer(hparams)
    x = torch.randn(2, 4, 12, dtype=torch.float64)

    layer(x)
    strengths = layer.routed_strengths()

    tokens = x.reshape(-1, 12)  # [T, d_in]
    expected = []
    for i in range(num_shared, hparams.num_experts):
        W_i = layer.furina_B[i].detach() @ layer.furina_A[i].detach()  # [d_out, d_in]
        direction = W_i / (torch.linalg.vector_norm(W_i, dim=1, keepdim=True) + hparams.eps)
        expected.append(torch.linalg.vector_norm(tokens @ direction.T, dim=-1))  # [T]
    expected = torch.stack(expected, dim=-1)  # [T, N]

    assert strengths.shape == (8, 5 - num_shared)
    torch.testing.assert_close(strengths.detach(), expected, **EXACT)


def test_routed_strengths_need_tracking() -> None:
    hparams = FurinaHyperparameters(r=3, num_experts=3, num_shared_experts=1, top_k=1)
    layer = tracked_layer(hparams)
    layer.track_selection = False

    layer(torch.randn(4, 12, dtype=torch.float64))

    with pytest.raises(RuntimeError, match="track_selection"):
        layer.routed_strengths()


TINY_LLAMA = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2
)


def tracked_llama(hparams: FurinaHyperparameters):
    model = random_llama(**TINY_LLAMA)
    torch.manual_seed(1)
    inject_furina(model, hparams, target_modules=["q_proj", "v_proj", "down_proj"])
    set_selection_tracking(model, True)
    return model


def test_collect_averages_over_layers() -> None:
    hparams = FurinaHyperparameters(r=4, num_experts=5, num_shared_experts=1, top_k=2)
    model = tracked_llama(hparams)
    input_ids = torch.tensor([[5, 17, 99, 3, 200], [7, 7, 150, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    model(input_ids, attention_mask=attention_mask)
    layers = [layer for _, layer in furina_layers(model)]

    collected = collect_selection_loss(layers, token_mask=attention_mask)

    flat_mask = attention_mask.reshape(-1).bool()
    per_layer = [
        selection_loss_terms(layer.routed_strengths(), top_k=2, token_mask=flat_mask)
        for layer in layers
    ]
    divergence = sum(terms.divergence for terms in per_layer) / len(per_layer)
    balance = sum(terms.balance for terms in per_layer) / len(per_layer)
    assert len(layers) == 6
    torch.testing.assert_close(collected.divergence, divergence, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(collected.balance, balance, rtol=1e-6, atol=1e-7)
    assert len({round(scalar(terms.divergence), 6) for terms in per_layer}) > 1


def test_collect_skips_all_shared_layers() -> None:
    hparams = FurinaHyperparameters(r=4, num_experts=2, num_shared_experts=2, top_k=1)
    model = tracked_llama(hparams)
    model(torch.tensor([[5, 17, 99]]))

    with pytest.raises(ValueError, match="no FURINA layer with routed experts"):
        collect_selection_loss(layer for _, layer in furina_layers(model))


def test_selection_loss_trains_routed_experts() -> None:
    # At step 0 the magnitude is 0, so the task loss gives routed A and B no gradient.
    # The selection loss does not depend on the magnitude and must train them.
    hparams = FurinaHyperparameters(r=4, num_experts=5, num_shared_experts=1, top_k=2)
    model = tracked_llama(hparams)
    model(torch.tensor([[5, 17, 99, 3, 200, 41]]))
    layers = [layer for _, layer in furina_layers(model)]

    collect_selection_loss(layers).total.backward()

    for layer in layers:
        routed_A_grad = layer.furina_A.grad[1:]
        routed_B_grad = layer.furina_B.grad[1:]
        assert torch.isfinite(routed_A_grad).all()
        assert torch.isfinite(routed_B_grad).all()
        assert routed_A_grad.abs().max() > 0
        assert routed_B_grad.abs().max() > 0


def test_selection_loss_ignores_own_magnitude() -> None:
    # Within one layer the strengths |What_i x| do not involve v. (In a model, a
    # layer's v still gets a gradient through the inputs of the layers after it.)
    hparams = FurinaHyperparameters(r=3, num_experts=4, num_shared_experts=1, top_k=2)
    layer = tracked_layer(hparams)
    layer(torch.randn(6, 12, dtype=torch.float64))

    collect_selection_loss([layer]).total.backward()

    assert layer.furina_magnitude.grad is None
    assert layer.furina_A.grad[1:].abs().max() > 0
