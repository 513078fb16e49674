"""Allocators: from per-gene evidence to per-gene sparsity ratios whose weighted mean is the target.

uniform: the target everywhere.
fisher:  MSP's initialisation (docs/design.md, From sensitivities to an allocation): log Fisher traces per
         weight, normalised to [0, 1], mapped linearly to [S+λ, S−λ] (more sensitive -> pruned less), shifted
         to meet the budget exactly.
owl:     Outlier-Weighed Layerwise sparsity (Yin et al. 2023): the fraction D of a gene's Wanda scores
         above M x their mean, normalised to [0, 1], mapped to [S+λ, S−λ] (more outliers -> pruned less),
         shifted to meet the budget, every ratio kept in [S−λ, S+λ].
global:  global magnitude pruning: one threshold t on |W| across all planned weights, the smallest that prunes
         exactly round(S · Σ n) of them (ties at t go to the earliest genes); a gene's ratio is the fraction
         of its weights at or under t. Found by bisection over float32 bit patterns, counting one module at a
         time (memory: one module's |W| in float32; time: ~32 passes over the weights). Ratios beyond
         [low, high] are clipped and the rest shifted to meet the budget again (``fit_shift``).
All budgets are counted in weights, so genes of different sizes (module granularity) are fair.
"""

from __future__ import annotations

import math
import struct
from typing import Iterable

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


def _float_of(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def magnitude_threshold(weights: Iterable[torch.Tensor], pruned: int) -> float:
    """The ``pruned``-th smallest |w| over all ``weights`` (1-based), i.e. the least float32 t with
    #{|w| <= t} >= pruned. Non-negative float32 values order like their bit patterns, so a bisection over
    those bits is exact in at most 31 counting passes; only one tensor's |w| exists at a time."""
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    if not 1 <= pruned <= total:
        raise ValueError(f"cannot prune {pruned} of {total} weights by a threshold")

    def at_most(bits: int) -> int:
        t = _float_of(bits)
        return sum(int((w.detach().float().abs() <= t).sum()) for w in weights)

    low, high = 0, 0x7F800000  # +0.0 .. +inf
    while low < high:
        middle = (low + high) // 2
        if at_most(middle) >= pruned:
            high = middle
        else:
            low = middle + 1
    return _float_of(low)


def global_ratios(
    weights: list[list[torch.Tensor]],
    sizes: list[int],
    target: float,
    low: float = 0.0,
    high: float = 0.99,
) -> tuple[list[float], float]:
    """Per gene (its members' weights), the fraction under one global |W| threshold that prunes exactly
    round(target · Σ sizes) weights; and the threshold. Bounds as ``fit_shift``."""
    pruned = round(target * sum(sizes))
    if pruned == 0:
        return fit_shift([0.0] * len(sizes), sizes, target, low, high), 0.0
    threshold = magnitude_threshold((w for gene in weights for w in gene), pruned)
    below = [sum(int((w.detach().float().abs() < threshold).sum()) for w in gene) for gene in weights]
    ties = [sum(int((w.detach().float().abs() == threshold).sum()) for w in gene) for gene in weights]
    counts, left = [], pruned - sum(below)
    for under, tied in zip(below, ties):
        taken = min(tied, left)
        counts.append(under + taken)
        left -= taken
    raw = [c / n for c, n in zip(counts, sizes)]
    if all(low <= r <= high for r in raw):
        return raw, threshold
    return fit_shift(raw, sizes, target, low, high), threshold
