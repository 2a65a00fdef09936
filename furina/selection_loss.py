"""Expert selection loss of FURINA: sharpen each token's expert mix and keep experts balanced.

The FURINA paper (arXiv:2509.14900) names a divergence term and a balance term but
does not define them exactly. This project's definitions, per FURINA layer, with
g_i = |What_i x|_2 the activation strength of routed expert i and
p_i = g_i / sum_j g_j over the N routed experts:

- divergence: L_div = mean over tokens of 1 - (sum of the top_k largest p_i), which is
  small when a few experts carry each token, as top-k routing would make them.
- balance (Switch Transformer style): L_bal = N * sum_i F_i * P_i, with F_i the fraction
  of tokens whose top-k contains expert i (no gradient) and P_i the mean of p_i. Since
  the F_i sum to top_k, it equals top_k when tokens spread evenly over the experts and
  grows up to N when every token favours the same experts.

The training loss adds selection_loss_weight * (L_div + L_bal), averaged over layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from furina.layer import FurinaLinear


@dataclass
class SelectionLoss:
    """Selection loss terms averaged over FURINA layers; `total` = divergence + balance."""

    divergence: torch.Tensor
    balance: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.divergence + self.balance


def selection_loss_terms(
    strengths: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> SelectionLoss:
    """Compute L_div and L_bal from routed-expert strengths g [T, N].

    token_mask [T] keeps only the tokens that count, such as non-padding ones. It may be
    bool or 0/1 integers like an attention mask: integers are converted, not used as indices.
    """
    if token_mask is not None:
        strengths = strengths[token_mask.bool()]
    num_routed = strengths.shape[-1]
    if strengths.shape[0] == 0:
        zero = strengths.sum() * 0.0
        return SelectionLoss(divergence=zero, balance=zero)

    probabilities = strengths / strengths.sum(dim=-1, keepdim=True)  # [T, N]
    top_values, top_indices = probabilities.topk(top_k, dim=-1)  # [T, K]
    divergence = (1.0 - top_values.sum(dim=-1)).mean()

    in_top_k = torch.zeros_like(probabilities).scatter_(-1, top_indices, 1.0)
    token_fraction = in_top_k.mean(dim=0).detach()  # F_i [N]
    mean_probability = probabilities.mean(dim=0)  # P_i [N]
    balance = num_routed * (token_fraction * mean_probability).sum()
    return SelectionLoss(divergence=divergence, balance=balance)


def collect_selection_loss(
    layers: Iterable[FurinaLinear], token_mask: torch.Tensor | None = None
) -> SelectionLoss:
    """Average the selection loss over every FURINA layer's last forward pass.

    token_mask has the batch's token shape ([B, T] or [T]) and is flattened to match
    the layers' recorded activations. Layers without routed experts are skipped.
    """
    flat_mask = token_mask.reshape(-1).bool() if token_mask is not None else None
    divergences, balances = [], []
    for layer in layers:
        if layer.hparams.num_routed_experts == 0:
            continue
        terms = selection_loss_terms(layer.routed_strengths(), layer.hparams.top_k, flat_mask)
        divergences.append(terms.divergence)
        balances.append(terms.balance)

    if not divergences:
        raise ValueError("no FURINA layer with routed experts recorded a forward pass")
    return SelectionLoss(
        divergence=torch.stack(divergences).mean(), balance=torch.stack(balances).mean()
    )
