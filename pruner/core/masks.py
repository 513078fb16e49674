"""Masks from importance scores. True = keep. Pure functions, exact counts."""

from __future__ import annotations

import torch

from mixsparse.pruner.core.spec import DENSE, NM, Spec


def mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep exactly the ``n`` highest scores in every group of ``m`` consecutive inputs of every row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def pruned_count(total: int, sparsity: float) -> int:
    return int(round(total * sparsity))


def mask_ratio(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Remove exactly round(sparsity * n) lowest scores, per output row or over the whole matrix."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = pruned_count(scores.shape[1], sparsity)
        if k:
            keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    else:
        k = pruned_count(scores.numel(), sparsity)
        if k:
            keep.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = False
    return keep


def mask_for(scores: torch.Tensor, spec: Spec, per_row: bool = True) -> torch.Tensor:
    if spec.kind == DENSE:
        return torch.ones_like(scores, dtype=torch.bool)
    if spec.kind == NM:
        return mask_nm(scores, spec.n, spec.m)
    return mask_ratio(scores, spec.sparsity, per_row)


def ranks(scores_: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Each weight's position in ascending score order (per row, or over the whole layer); int16 when it fits."""
    flat = scores_ if per_row else scores_.reshape(1, -1)
    order = flat.argsort(dim=1)
    width = flat.shape[1]
    dtype = torch.int16 if width <= torch.iinfo(torch.int16).max else torch.int32
    rank = torch.empty_like(order, dtype=dtype)
    rank.scatter_(1, order, torch.arange(width, dtype=dtype, device=flat.device).expand_as(order).contiguous())
    return rank.reshape(scores_.shape)
