"""Allocators: from per-gene evidence to per-gene sparsity ratios whose weighted mean is the target.

uniform: the target everywhere.
fisher:  MSP's initialisation (MSP.md §2): log Fisher traces per weight, normalised to [0, 1], mapped
         linearly to [S+λ, S−λ] (more sensitive -> pruned less), shifted to meet the budget exactly.
owl:     Outlier-Weighed Layerwise sparsity (Yin et al. 2023): the fraction D of a gene's Wanda scores
         above M x their mean, normalised to [0, 1], mapped to [S+λ, S−λ] (more outliers -> pruned less),
         shifted to meet the budget, every ratio kept in [S−λ, S+λ].
All budgets are counted in weights, so genes of different sizes (module granularity) are fair.
"""

from __future__ import annotations

import math

import torch

from mixsparse.runtime.errors import MixsparseError


def fit_shift(raw: list[float], sizes: list[int], target: float, low: float, high: float) -> list[float]:
    """clip(raw + c, low, high) with the one constant c (bisection) that makes Σ n·r = target · Σ n."""
    total = sum(sizes)
    if not low - 1e-12 <= target <= high + 1e-12:
        raise MixsparseError(f"target {target:g} is infeasible: ratios are bounded to [{low:g}, {high:g}]")

    def mean(shift: float) -> float:
        return sum(n * min(max(r + shift, low), high) for r, n in zip(raw, sizes)) / total

    lo, hi = low - max(raw) - 1.0, high - min(raw) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return [min(max(r + hi, low), high) for r in raw]


def _normalised(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return [0.5] * len(values)
    return [(v - low) / (high - low) for v in values]


def uniform_ratios(sizes: list[int], target: float) -> list[float]:
    return [target] * len(sizes)


def fisher_ratios(
    per_weight_traces: list[float],
    sizes: list[int],
    target: float,
    spread: float = 0.1,
    low: float = 0.0,
    high: float = 0.99,
) -> list[float]:
    logs = [math.log(max(t, 1e-300)) for t in per_weight_traces]
    raw = [target + spread - 2 * spread * u for u in _normalised(logs)]
    return fit_shift(raw, sizes, target, low, high)


def outlier_ratio(scores: list[torch.Tensor], multiple: float = 5.0) -> float:
    """OWL's D: the fraction of a gene's scores above ``multiple`` x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > multiple * flat.mean()).float().mean())


def owl_ratios(
    outliers: list[float], sizes: list[int], target: float, lam: float = 0.08, low: float = 0.0, high: float = 0.99
) -> list[float]:
    raw = [target + lam - 2 * lam * u for u in _normalised(outliers)]
    return fit_shift(raw, sizes, target, max(low, target - lam), min(high, target + lam))
