"""SparseGPT: prune column by column and let the remaining weights absorb the error (OBS).

Follows Frantar & Alistarh (2023): the upper Cholesky factor of H⁻¹ gives every column's OBS update;
columns are processed in blocks of ``blocksize`` with the update to later blocks applied lazily, once
per block. Masks are chosen on the fly: per block for unstructured sparsity (the lowest w²/[H⁻¹]²_jj
of the block), per group of M columns for N:M. All arithmetic is float32.
"""

from __future__ import annotations

import logging

import torch

from mixsparse.pruner.core.masks import pruned_count
from mixsparse.pruner.core.spec import NM, UNSTRUCTURED, Spec
from mixsparse.runtime.errors import MixsparseError

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); λ grows ×10 if H is not positive definite."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        log.warning("Cholesky of the Hessian failed with dampening %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise MixsparseError(f"SparseGPT: the Hessian is not positive definite even with dampening {damp / 10:g}")


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, spec: Spec, blocksize: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """The pruned and updated weight (float32). ``hessian`` is Σ x xᵀ over calibration tokens."""
    W = weight.float().clone()
    rows, cols = W.shape
    if spec.kind == NM and blocksize % spec.m:
        raise MixsparseError(f"SparseGPT blocksize {blocksize} must be a multiple of M={spec.m}")
    H = hessian.to(W.device, torch.float32).clone()
    dead = H.diagonal() == 0  # inputs never active: their weights cannot matter
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0
    hinv = inverse_hessian_factor(H, damp)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if spec.kind == UNSTRUCTURED:
            # cumulative rounding keeps the layer's total exactly round(sparsity * rows * cols)
            k = pruned_count(rows * i2, spec.sparsity) - pruned_count(rows * i1, spec.sparsity)
            if k:
                saliency = W1.square() / d.square()
                prune1.view(-1)[saliency.reshape(-1).topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if spec.kind == NM and i % spec.m == 0:
                saliency = W1[:, i : i + spec.m].square() / d[i : i + spec.m].square()
                drop = saliency.topk(spec.m - spec.n, dim=1, largest=False).indices
                prune1[:, i : i + spec.m].scatter_(1, drop, True)
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return W
