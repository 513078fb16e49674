"""Calibration statistics of a linear layer's input, as plain values.

``sq_norm[j]`` = Σ_tokens x_j² (Wanda's ‖X_j‖²); ``hessian`` = Σ_tokens x xᵀ (SparseGPT's H, up to
scale), both accumulated in float32 whatever the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    tokens: int
    sq_norm: torch.Tensor
    hessian: torch.Tensor | None = None


def empty_stats(in_features: int, hessian: bool, device: torch.device | str = "cpu") -> InputStats:
    return InputStats(
        0,
        torch.zeros(in_features, dtype=torch.float32, device=device),
        torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None,
    )


def accumulate(x: torch.Tensor, stats: InputStats) -> InputStats:
    """Add a batch of inputs (..., in_features) to ``stats`` (in place) and return it."""
    x = x.reshape(-1, x.shape[-1]).float()
    stats.sq_norm += x.square().sum(0)
    if stats.hessian is not None:
        stats.hessian.addmm_(x.T, x)
    stats.tokens += x.shape[0]
    return stats
