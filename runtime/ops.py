"""``torch.ops.mixsparse.sparse_linear``: the dense, cuSPARSELt and CUTLASS GEMMs as a registered op on
plain tensors.

A registered op (not a tensor subclass) is what vLLM's compile path and CUDA graphs can take: the fake
implementation gives the output shape without running anything, and the real one makes no host syncs.
Its arguments are a ``SparseWeight``'s fields in the CPU kernel op's order
(``torch.ops.mixsparse_cpu.sparse_linear(x, values, mask, offsets, bias, out_features)``): x, values, the
index (here CUTLASS's 2:4 ``meta``, there the bitmask and row offsets), bias, out_features, then the
backend. Layers call neither op themselves: ``runtime.sparse_linear.sparse_linear`` picks one.
"""

from __future__ import annotations

import torch

from mixsparse.runtime import kernels
from mixsparse.runtime.weight import BACKEND_IDS

_NAMES = {number: name for name, number in BACKEND_IDS.items()}


@torch.library.custom_op("mixsparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    backend: int,
) -> torch.Tensor:
    return kernels.linear(_NAMES[backend], x, values, meta, bias, out_features)


@sparse_linear.register_fake
def _(x, values, meta, bias, out_features, backend):
    return x.new_empty((*x.shape[:-1], out_features))
