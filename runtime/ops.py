"""``torch.ops.mixsparse.sparse_linear``: the 2:4 GEMM as a registered op on plain tensors.

A registered op (not a tensor subclass) is what vLLM's compile path and CUDA graphs can take: the fake
implementation gives the output shape without running anything, and the real one makes no host syncs.
"""

from __future__ import annotations

import torch

from mixsparse.runtime import kernels

_NAMES = {number: name for name, number in kernels.BACKEND_IDS.items()}


@torch.library.custom_op("mixsparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    meta: torch.Tensor | None,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    backend: int,
    out_features: int,
) -> torch.Tensor:
    return kernels.linear(_NAMES[backend], x, weight, meta, offsets, bias, out_features)


@sparse_linear.register_fake
def _(x, weight, meta, offsets, bias, backend, out_features):
    return x.new_empty((*x.shape[:-1], out_features))
