"""Calibration statistics of a linear layer's input, as plain values.

``sq_norm[j]`` = Σ_tokens x_j² (Wanda's ‖X_j‖²); ``hessian`` = Σ_tokens x xᵀ (SparseGPT's H, up to
scale), both accumulated in float32 whatever the activation dtype. ``gradient`` (GBLM-Pruner's
statistic, sensitivity.weight_gradients) belongs to one module's weight, not to its input: modules reading
the same input share their InputStats, and each gets its own copy with its gradient set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.calibration import run_blocks


@dataclass
class GradientStats:
    """‖G_ij‖₂ = sqrt(Σ_n (∂ℓ_n/∂W_ij)²) over calibration sequences n of the dense model (float32, out x in)."""

    norm: torch.Tensor
    samples: int  # sequences n
    tokens: int  # their tokens (samples x tokens per sequence)


@dataclass
class InputStats:
    tokens: int
    sq_norm: torch.Tensor
    hessian: torch.Tensor | None = None
    gradient: GradientStats | None = None


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


class SharedInputs:
    """A block's input statistics for the calibration runner's callbacks: one InputStats per distinct input
    tensor (q/k/v and gate/up read the same one, so a fused group's Hessian is accumulated once), and each
    module its own copy carrying its gradient norms (GBLM). ``clear`` at every new block."""

    def __init__(self, hessian: bool, gradients: dict[str, GradientStats] | None = None):
        self.hessian, self.gradients = hessian, gradients or {}
        self.seen: list[tuple[torch.Tensor, InputStats]] = []  # inputs kept alive: no reuse of addresses

    def clear(self) -> None:
        self.seen.clear()

    def of(self, name: str, x: torch.Tensor) -> InputStats:
        stats = next((s for seen, s in self.seen if seen is x), None)
        if stats is None:
            stats = accumulate(x, empty_stats(x.shape[-1], self.hessian, x.device))
            self.seen.append((x, stats))
        return replace(stats, gradient=self.gradients.get(name))


@torch.no_grad()
def activation_stats(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    names: list[str],
    device: str | torch.device = "cpu",
    after_block: Callable[[int], None] = lambda index: None,
) -> dict[str, InputStats]:
    """Every module's input statistics (Σ_tokens x_j², no Hessian), from one pass over the dense model."""
    stats: dict[str, InputStats] = {}

    def collect(index: int, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        collected = accumulate(x, empty_stats(x.shape[-1], hessian=False, device=x.device))
        stats[name] = InputStats(collected.tokens, collected.sq_norm.cpu())

    run_blocks(adapter, windows, collect, device, names=set(names), after_block=after_block)
    return stats
