"""The base metrics, as a registry of pure callables: how important each weight is (``score``), and the
pruned weight of a layer under a Spec (``prune``), in the shape of llm-compressor's wanda_sparsify.py /
sgpt_sparsify.py. A new metric is one entry of ``METRICS``; nothing else branches on a metric's name.

magnitude: |W|, compared over the whole layer (no calibration).
wanda:     |W| · ‖X_j‖, compared within each output row (Sun et al. 2023).
sparsegpt: OBS with a blocked, lazy-batch weight update (Frantar & Alistarh 2023), see core/sparsegpt.py.
gblm:      GBLM-Pruner (Das et al. 2023, "Beyond Size: How Gradients Shape Pruning Decisions in Large
           Language Models", arXiv 2311.04902), Wanda plus a gradient term, compared within each output row:

               S_ij = |W_ij| · ‖X_j‖₂ / √N  +  α · |W_ij| · ‖G_ij‖₂,     α = 100

           The paper writes W_m[i,j] = |W[i,j]|·‖X[:,j]‖₂ + α·|W[i,j]|·‖G[:,i,j]‖_p with p = 2; the constants
           are those of its code (github.com/VILA-Lab/GBLM-Pruner): gradient_computation.py takes one backward
           of the mean next-token loss per calibration sequence n (N = 128 of 2048 tokens) on the dense model,
           accumulates Σ_n (scale·g_n)² per weight with --scale 100 and stores its square root, so
           α·‖G_ij‖₂ = 100·sqrt(Σ_n g_n,ij²) (a sum over sequences, not a mean); lib/prune.py prune_gblm adds
           that term, times |W|, to Wanda's |W|·sqrt(scaler_row), whose scaler_row (lib/layerwrapper.py) is
           Σ_tokens x_j² / N, the squared input norm per sequence; masks per output row (unstructured) or per
           group of M (N:M), as Wanda. The input norms come from the sequential pass (earlier blocks already
           pruned), the gradients from the dense model, as there; here N is counted as tokens / tokens per
           sequence of the gradient pass (the same calibration windows). Cost: one extra forward+backward
           per calibration sequence, and the squared gradients kept per weight (model size in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mixsparse.pruner.core.masks import mask_for
from mixsparse.pruner.core.sparsegpt import sparsegpt_prune
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.core.stats import InputStats
from mixsparse.runtime.errors import MixsparseError


def magnitude_score(weight: torch.Tensor, stats: InputStats | None = None) -> torch.Tensor:
    return weight.abs().float()


def wanda_score(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return weight.abs().float() * stats.sq_norm.sqrt().to(weight.device).unsqueeze(0)


GBLM_ALPHA = 100.0  # GBLM-Pruner's gradient_computation.py --scale (default 100)


def gblm_score(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    gradient = stats.gradient
    if gradient is None:
        raise MixsparseError("gblm needs the gradient norms of the dense model (sensitivity.weight_gradients)")
    sequences = stats.tokens * gradient.samples / gradient.tokens  # N: the activation pass's sequences
    activation = (stats.sq_norm / sequences).sqrt().to(weight.device).unsqueeze(0)
    return weight.abs().float() * (activation + GBLM_ALPHA * gradient.norm.to(weight.device))


def magnitude_prune(weight: torch.Tensor, spec: Spec, stats: InputStats | None = None, **options) -> torch.Tensor:
    return weight * mask_for(magnitude_score(weight), spec, per_row=False)


def wanda_prune(weight: torch.Tensor, spec: Spec, stats: InputStats, **options) -> torch.Tensor:
    return weight * mask_for(wanda_score(weight, stats), spec, per_row=True)


def gblm_prune(weight: torch.Tensor, spec: Spec, stats: InputStats, **options) -> torch.Tensor:
    return weight * mask_for(gblm_score(weight, stats), spec, per_row=True)


def sparsegpt_prune_weight(
    weight: torch.Tensor, spec: Spec, stats: InputStats, blocksize: int = 128, damp: float = 0.01
) -> torch.Tensor:
    return sparsegpt_prune(weight, stats.hessian, spec, blocksize=blocksize, damp=damp)


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[torch.Tensor, InputStats | None], torch.Tensor]
    # (float32 weight, non-dense spec, stats, **options) -> pruned float32 weight; options are SparseGPT's
    prune: Callable[..., torch.Tensor]
    needs_calibration: bool
    needs_hessian: bool
    per_row: bool  # the comparison group of ``score``: each output row, or the whole layer
    scores_as: str  # what a plan search ranks weights by: SparseGPT's saliency needs its sequential update
    # stats.gradient: per-weight gradient norms of the dense model (sensitivity.weight_gradients), one
    # forward+backward per calibration sequence before pruning
    needs_gradients: bool = False


METRICS = {
    metric.name: metric
    for metric in (
        Metric(
            "magnitude",
            magnitude_score,
            magnitude_prune,
            needs_calibration=False,
            needs_hessian=False,
            per_row=False,
            scores_as="magnitude",
        ),
        Metric(
            "wanda",
            wanda_score,
            wanda_prune,
            needs_calibration=True,
            needs_hessian=False,
            per_row=True,
            scores_as="wanda",
        ),
        Metric(
            "sparsegpt",
            wanda_score,
            sparsegpt_prune_weight,
            needs_calibration=True,
            needs_hessian=True,
            per_row=True,
            scores_as="wanda",
        ),
        Metric(
            "gblm",
            gblm_score,
            gblm_prune,
            needs_calibration=True,
            needs_hessian=False,
            per_row=True,
            scores_as="gblm",
            needs_gradients=True,
        ),
    )
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise MixsparseError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}") from None


def score(metric: str, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    """Importance scores of a layer; SparseGPT's initial scores are Wanda's (its update goes further)."""
    return get_metric(metric).score(weight, stats)


def prune_weight(metric: str, weight: torch.Tensor, spec: Spec, stats: InputStats | None, **options) -> torch.Tensor:
    """The pruned weight (float32) of a layer under ``spec``; the input weight is left untouched.

    ``options`` (blocksize, damp) tune SparseGPT's update; the other metrics have none.
    """
    weight = weight.float()
    if spec.is_dense:
        return weight.clone()
    return get_metric(metric).prune(weight, spec, stats, **options)
