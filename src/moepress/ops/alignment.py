"""Neuron permutation alignment of SwiGLU experts (M-SMoE §3.1, weight matching / Git Re-Basin).

An expert `E(x) = W_D (σ(W_G x) ⊙ W_U x)` is unchanged when its intermediate neurons are permuted
consistently: rows of W_G and W_U (and their biases) and columns of W_D with the same permutation.
"""

from __future__ import annotations

import torch


def neuron_features(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`[I, 2H + H]` per-neuron weight signature: its gate row, up row and down column, concatenated."""
    return torch.cat([gate, up, down.T], dim=1).double()


def match_neurons(expert: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Permutation `perm [I]` maximising `Σ_n <reference_n, expert_perm[n]>` (Hungarian algorithm).

    Args:
        expert, reference: `[I, D]` neuron features (`neuron_features`).
    Returns:
        `perm` such that neuron n of the aligned expert is neuron `perm[n]` of the original.
    """
    from scipy.optimize import linear_sum_assignment

    score = (reference.double() @ expert.double().T).numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = torch.empty(reference.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute_expert(perm: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None):
    """Apply a neuron permutation: gate/up rows, gate/up biases and down columns together.

    Returns `(gate [I,H], up [I,H], down [H,I], gate_bias, up_bias)`; the expert's function is unchanged.
    """
    gb = None if gate_bias is None else gate_bias[perm]
    ub = None if up_bias is None else up_bias[perm]
    return gate[perm], up[perm], down[:, perm], gb, ub
