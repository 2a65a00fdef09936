"""FurinaLinear, expert_row_norms and fold_furina against float64 references from the formulas.

The reference implements FURINA (arXiv:2509.14900) expert by expert, with explicit
W_i = B_i A_i matrices and explicit row norms, so it shares no code with furina.layer:

    y = W0 x + b + s * sum_{i<S} B_i A_i x + sum_{i>=S} diag(v) diag(d_i + eps)^-1 B_i A_i x
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from furina.adapter import FurinaAdapterConfig, save_adapter
from furina.inject import (
    adapter_state_dict,
    attach_adapter,
    furina_layers,
    inject_furina,
    remove_furina,
)
from furina.layer import FurinaHyperparameters, FurinaLinear, expert_row_norms, fold_furina
from furina.synthetic import random_llama

D_IN, D_OUT, RANK = 12, 10, 3

# Two exact formulas evaluated in float64 agree to about 1e-15 relative. The bound
# 1e-12 leaves room for the longer sums of the batched path.
FLOAT64_TOLERANCE = dict(rtol=1e-12, atol=1e-12)


def reference_output(
    x: torch.Tensor,
    base: nn.Linear,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    hparams: FurinaHyperparameters,
) -> torch.Tensor:
    """Compute the FURINA layer output in float64, one expert at a time."""
    x = x.double()
    W0 = base.weight.detach().double()
    y = x @ W0.T
    if base.bias is not None:
        y = y + base.bias.detach().double()

    if hparams.use_rslora:
        scaling = hparams.lora_alpha / math.sqrt(hparams.r)
    else:
        scaling = hparams.lora_alpha / hparams.r

    for i in range(hparams.num_experts):
        W_i = lora_B[i].double() @ lora_A[i].double()  # [d_out, d_in]
        if i < hparams.num_shared_experts:
            y = y + scaling * (x @ W_i.T)
            continue
        row_norms = torch.linalg.vector_norm(W_i, dim=1)  # d_i [d_out]
        direction = torch.diag(1.0 / (row_norms + hparams.eps)) @ W_i  # What_i
        y = y + x @ (torch.diag(magnitude.double()) @ direction).T
    return y


def randomized_layer(
    hparams: FurinaHyperparameters, seed: int = 0, bias: bool = True
) -> FurinaLinear:
    """Wrap a random Linear and give every FURINA tensor non-zero random values."""
    torch.manual_seed(seed)
    layer = FurinaLinear(nn.Linear(D_IN, D_OUT, bias=bias), hparams)
    with torch.no_grad():
        layer.furina_A.normal_()
        layer.furina_B.normal_()
        layer.furina_magnitude.uniform_(0.5, 2.0)
    return layer


def layer_reference(layer: FurinaLinear, x: torch.Tensor) -> torch.Tensor:
    return reference_output(
        x,
        layer.base_layer,
        layer.furina_A.detach(),
        layer.furina_B.detach(),
        layer.furina_magnitude.detach(),
        layer.hparams,
    )


LAYER_CASES = [
    pytest.param(dict(num_experts=4, num_shared_experts=0), id="S0"),
    pytest.param(dict(num_experts=4, num_shared_experts=1), id="S1"),
    pytest.param(dict(num_experts=5, num_shared_experts=2), id="S2"),
    pytest.param(dict(num_experts=4, num_shared_experts=1, use_rslora=True), id="S1-rslora"),
    pytest.param(dict(num_experts=3, num_shared_experts=3), id="all-shared"),
]


@pytest.mark.parametrize("options", LAYER_CASES)
def test_forward_matches_reference_float64(options: dict) -> None:
    hparams = FurinaHyperparameters(r=RANK, lora_alpha=7.0, top_k=1, **options)
    layer = randomized_layer(hparams).double()
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)

    actual = layer(x)

    assert actual.shape == (2, 5, D_OUT)
    torch.testing.assert_close(actual, layer_reference(layer, x), **FLOAT64_TOLERANCE)


@pytest.mark.parametrize("options", LAYER_CASES)
def test_forward_float32_close_to_reference(options: dict) -> None:
    hparams = FurinaHyperparameters(r=RANK, lora_alpha=7.0, top_k=1, **options)
    layer = randomized_layer(hparams)
    x = torch.randn(7, D_IN)

    actual = layer(x)

    # float32 rounding of sums over d_in and E*r terms: about 1e-6 relative.
    torch.testing.assert_close(actual.double(), layer_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_rslora_changes_shared_scaling() -> None:
    plain = FurinaHyperparameters(r=4, lora_alpha=8.0, num_experts=2, num_shared_experts=1, top_k=1)
    rslora = FurinaHyperparameters(
        r=4, lora_alpha=8.0, num_experts=2, num_shared_experts=1, top_k=1, use_rslora=True
    )

    assert plain.shared_scaling == 8.0 / 4
    assert rslora.shared_scaling == 8.0 / 2


def test_expert_row_norms_match_direct_norms() -> None:
    torch.manual_seed(1)
    lora_A = torch.randn(4, RANK, D_IN, dtype=torch.float64)
    lora_B = torch.randn(4, D_OUT, RANK, dtype=torch.float64)

    expected = torch.stack(
        [torch.linalg.vector_norm(lora_B[i] @ lora_A[i], dim=1) for i in range(4)]
    )

    torch.testing.assert_close(expert_row_norms(lora_A, lora_B), expected, **FLOAT64_TOLERANCE)


def test_expert_row_norms_zero_row_has_finite_gradient() -> None:
    torch.manual_seed(2)
    lora_A = torch.randn(1, RANK, D_IN, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(1, D_OUT, RANK, dtype=torch.float64)
    lora_B[0, 3] = 0.0
    lora_B.requires_grad_(True)

    norms = expert_row_norms(lora_A, lora_B)
    norms.sum().backward()

    assert norms[0, 3].item() < 1e-100
    assert torch.isfinite(lora_A.grad).all()
    assert torch.isfinite(lora_B.grad).all()


@pytest.mark.parametrize("options", LAYER_CASES)
def test_fold_reproduces_reference_float64(options: dict) -> None:
    hparams = FurinaHyperparameters(r=RANK, lora_alpha=7.0, top_k=1, **options)
    layer = randomized_layer(hparams, bias=False)
    lora_A = layer.furina_A.detach().double()
    lora_B = layer.furina_B.detach().double()
    magnitude = layer.furina_magnitude.detach().double()

    folded_B, folded_A = fold_furina(lora_A, lora_B, magnitude, hparams)
    merged_weight = layer.base_layer.weight.detach().double() + folded_B @ folded_A
    x = torch.randn(9, D_IN, dtype=torch.float64)

    assert folded_B.shape == (D_OUT, hparams.num_experts * RANK)
    assert folded_A.shape == (hparams.num_experts * RANK, D_IN)
    torch.testing.assert_close(x @ merged_weight.T, layer_reference(layer, x), **FLOAT64_TOLERANCE)


def test_fold_changes_weight() -> None:
    hparams = FurinaHyperparameters(r=RANK, num_experts=4, num_shared_experts=1, top_k=1)
    layer = randomized_layer(hparams)

    folded_B, folded_A = layer.folded_lora(torch.float64)

    assert (folded_B @ folded_A).abs().max().item() > 1e-3


def test_routed_experts_are_permutation_invariant() -> None:
    hparams = FurinaHyperparameters(r=RANK, num_experts=5, num_shared_experts=1, top_k=1)
    layer = randomized_layer(hparams).double()
    x = torch.randn(6, D_IN, dtype=torch.float64)
    expected = layer(x)

    order = torch.tensor([0, 3, 1, 4, 2])  # shared expert 0 stays first
    with torch.no_grad():
        layer.furina_A.copy_(layer.furina_A[order])
        layer.furina_B.copy_(layer.furina_B[order])

    torch.testing.assert_close(layer(x), expected, **FLOAT64_TOLERANCE)


def test_eight_copies_of_expert_equal_eight_times_one() -> None:
    # Every routed expert acts on x on its own, so 8 identical experts give 8 times
    # the update of one: a batched path that mixed experts up would break this.
    single = FurinaHyperparameters(r=RANK, num_experts=1, num_shared_experts=0, top_k=1)
    eight = FurinaHyperparameters(r=RANK, num_experts=8, num_shared_experts=0, top_k=1)
    one_layer = randomized_layer(single).double()
    eight_layer = FurinaLinear(one_layer.base_layer, eight).double()
    with torch.no_grad():
        eight_layer.furina_A.copy_(one_layer.furina_A.expand(8, -1, -1))
        eight_layer.furina_B.copy_(one_layer.furina_B.expand(8, -1, -1))
        eight_layer.furina_magnitude.copy_(one_layer.furina_magnitude)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    base_output = one_layer.base_layer(x)

    one_update = one_layer(x) - base_output
    eight_update = eight_layer(x) - base_output

    torch.testing.assert_close(eight_update, 8 * one_update, **FLOAT64_TOLERANCE)
    assert one_update.abs().max().item() > 1e-3


def test_row_norms_stay_in_graph() -> None:
    # The layer does not detach d_i (DoRA's memory trick), so its gradients are those
    # of the exact formula, which the float64 reference differentiates by autograd.
    hparams = FurinaHyperparameters(r=RANK, num_experts=4, num_shared_experts=1, top_k=1)
    layer = randomized_layer(hparams).double()
    x = torch.randn(5, D_IN, dtype=torch.float64)
    reference_A = layer.furina_A.detach().clone().requires_grad_(True)
    reference_B = layer.furina_B.detach().clone().requires_grad_(True)
    reference_magnitude = layer.furina_magnitude.detach().clone().requires_grad_(True)

    layer(x).square().sum().backward()
    reference = reference_output(
        x, layer.base_layer, reference_A, reference_B, reference_magnitude, hparams
    )
    reference.square().sum().backward()

    torch.testing.assert_close(layer.furina_A.grad, reference_A.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.furina_B.grad, reference_B.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        layer.furina_magnitude.grad, reference_magnitude.grad, rtol=1e-10, atol=1e-10
    )


def test_base_weights_frozen() -> None:
    layer = FurinaLinear(nn.Linear(D_IN, D_OUT), FurinaHyperparameters(r=RANK))

    trainable = {name for name, parameter in layer.named_parameters() if parameter.requires_grad}

    assert trainable == {"furina_A", "furina_B", "furina_magnitude"}


def test_hyperparameters_reject_invalid_values() -> None:
    with pytest.raises(ValueError, match="num_shared_experts"):
        FurinaHyperparameters(num_experts=2, num_shared_experts=3)
    with pytest.raises(ValueError, match="top_k"):
        FurinaHyperparameters(num_experts=3, num_shared_experts=1, top_k=3)
    with pytest.raises(ValueError, match="eps"):
        FurinaHyperparameters(eps=0.0)
    with pytest.raises(ValueError, match="r must"):
        FurinaHyperparameters(r=0)


# Whole-model tests on a tiny random Llama.

TINY_LLAMA = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2
)
TINY_HPARAMS = FurinaHyperparameters(
    r=4, lora_alpha=8.0, num_experts=4, num_shared_experts=1, top_k=2
)


def tiny_input_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 99, 3, 200, 41], [7, 7, 150, 8, 1, 255]])


def test_fresh_injection_gives_base_logits() -> None:
    model = random_llama(**TINY_LLAMA)
    input_ids = tiny_input_ids()
    with torch.no_grad():
        base_logits = model(input_ids).logits

    torch.manual_seed(3)
    wrapped = inject_furina(model, TINY_HPARAMS)
    with torch.no_grad():
        furina_logits = model(input_ids).logits

    assert len(wrapped) == 2 * 7
    assert torch.equal(furina_logits, base_logits)


def test_step_zero_gradients_finite() -> None:
    model = random_llama(**TINY_LLAMA)
    torch.manual_seed(4)
    inject_furina(model, TINY_HPARAMS)
    input_ids = tiny_input_ids()

    loss = model(input_ids, labels=input_ids).loss
    loss.backward()

    num_shared = TINY_HPARAMS.num_shared_experts
    for path, layer in furina_layers(model):
        for name in ("furina_A", "furina_B", "furina_magnitude"):
            gradient = getattr(layer, name).grad
            assert gradient is not None, f"{path}.{name} has no gradient"
            assert torch.isfinite(gradient).all(), f"{path}.{name} has a non-finite gradient"
        assert layer.furina_magnitude.grad.abs().max() > 0, f"{path}: magnitude gradient is zero"
        assert layer.furina_B.grad[:num_shared].abs().max() > 0, f"{path}: shared B gradient is 0"
    base_gradients = [p.grad for n, p in model.named_parameters() if "furina_" not in n]
    assert all(gradient is None for gradient in base_gradients)


def test_inject_remove_restores_modules() -> None:
    model = random_llama(**TINY_LLAMA)
    originals = {path: module for path, module in model.named_modules()}
    input_ids = tiny_input_ids()
    with torch.no_grad():
        base_logits = model(input_ids).logits

    wrapped = inject_furina(model, TINY_HPARAMS, target_modules=["q_proj", "down_proj"])
    for _, layer in furina_layers(model):
        with torch.no_grad():
            layer.furina_magnitude.fill_(1.0)
    remove_furina(model)

    assert sorted(wrapped) == sorted(p for p in originals if p.endswith(("q_proj", "down_proj")))
    assert list(furina_layers(model)) == []
    restored = dict(model.named_modules())
    assert restored.keys() == originals.keys()
    for path, module in originals.items():
        assert restored[path] is module, f"{path} was not restored"
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base_logits)


def test_inject_rejects_second_injection() -> None:
    model = random_llama(**TINY_LLAMA)
    inject_furina(model, TINY_HPARAMS)

    with pytest.raises(ValueError, match="already a FurinaLinear"):
        inject_furina(model, TINY_HPARAMS)


def test_inject_rejects_unknown_targets() -> None:
    model = random_llama(**TINY_LLAMA)

    with pytest.raises(ValueError, match="c_attn"):
        inject_furina(model, TINY_HPARAMS, target_modules=["c_attn"])


def test_attach_saved_adapter_reproduces_logits(tmp_path) -> None:
    model = random_llama(**TINY_LLAMA)
    torch.manual_seed(5)
    inject_furina(model, TINY_HPARAMS, target_modules=["q_proj", "v_proj", "up_proj"])
    for _, layer in furina_layers(model):
        with torch.no_grad():
            layer.furina_B.normal_(std=0.05)
            layer.furina_magnitude.uniform_(0.1, 0.5)
    config = FurinaAdapterConfig(
        base_model_name_or_path="tiny-llama",
        base_model_fingerprint="sha256:test",
        r=TINY_HPARAMS.r,
        lora_alpha=TINY_HPARAMS.lora_alpha,
        num_experts=TINY_HPARAMS.num_experts,
        num_shared_experts=TINY_HPARAMS.num_shared_experts,
        top_k=TINY_HPARAMS.top_k,
        eps=TINY_HPARAMS.eps,
        target_modules=["q_proj", "v_proj", "up_proj"],
        selection_loss_weight=0.01,
    )
    save_adapter(tmp_path / "adapter", config, adapter_state_dict(model))
    input_ids = tiny_input_ids()
    with torch.no_grad():
        expected = model(input_ids).logits

    fresh = random_llama(**TINY_LLAMA)
    with torch.no_grad():
        base_logits = fresh(input_ids).logits
    attach_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        actual = fresh(input_ids).logits

    assert not fresh.training
    assert len(list(furina_layers(fresh))) == 3 * 2
    assert torch.equal(actual, expected)
    assert (actual - base_logits).abs().max().item() > 1e-4


def test_inference_fold_cache_follows_updates():
    torch.manual_seed(0)
    layer = FurinaLinear(torch.nn.Linear(6, 5), FurinaHyperparameters(r=2, num_experts=3))
    x = torch.randn(4, 6)

    with torch.no_grad():
        before = layer(x)
        layer.furina_magnitude.fill_(0.5)
        after_update = layer(x)
        layer.furina_magnitude.data = torch.full_like(layer.furina_magnitude, 0.25)
        after_replace = layer(x)
    expected = layer(x)

    assert torch.equal(before, layer.base_layer(x))
    assert not torch.allclose(after_update, before)
    assert not torch.allclose(after_replace, after_update)
    assert torch.allclose(after_replace, expected, atol=1e-6)
