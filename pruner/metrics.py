"""The base metrics: how important each weight is, and how a layer is pruned under a Spec.

magnitude: |W|, compared over the whole layer (no calibration).
wanda:     |W| · ‖X_j‖, compared within each output row (Sun et al. 2023).
sparsegpt: OBS with a blocked, lazy-batch weight update (Frantar & Alistarh 2023), see sparsegpt.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixsparse.pruner.masks import mask_for
from mixsparse.pruner.sparsegpt import sparsegpt_prune
from mixsparse.pruner.spec import Spec
from mixsparse.pruner.stats import InputStats
from mixsparse.runtime.errors import MixsparseError


@dataclass(frozen=True)
class Metric:
    name: str
    needs_calibration: bool
    needs_hessian: bool
    per_row: bool  # unstructured comparison group: each output row, or the whole layer


METRICS = {
    "magnitude": Metric("magnitude", needs_calibration=False, needs_hessian=False, per_row=False),
    "wanda": Metric("wanda", needs_calibration=True, needs_hessian=False, per_row=True),
    "sparsegpt": Metric("sparsegpt", needs_calibration=True, needs_hessian=True, per_row=True),
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise MixsparseError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}") from None


def magnitude_score(weight: torch.Tensor, stats: InputStats | None = None) -> torch.Tensor:
    return weight.abs().float()


def wanda_score(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return weight.abs().float() * stats.sq_norm.sqrt().to(weight.device).unsqueeze(0)


def score(metric: str, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    """Importance scores of a layer; SparseGPT's initial scores are Wanda's (its update goes further)."""
    return magnitude_score(weight) if metric == "magnitude" else wanda_score(weight, stats)


def prune_weight(metric: str, weight: torch.Tensor, spec: Spec, stats: InputStats | None, **options) -> torch.Tensor:
    """The pruned weight (float32) of a layer under ``spec``; the input weight is left untouched.

    ``options`` (blocksize, damp) tune SparseGPT's update; the other metrics have none.
    """
    weight = weight.float()
    if spec.is_dense:
        return weight.clone()
    if metric == "sparsegpt":
        return sparsegpt_prune(weight, stats.hessian, spec, **options)
    keep = mask_for(score(metric, weight, stats), spec, per_row=get_metric(metric).per_row)
    return weight * keep
