"""The GEMM backends for a packed 2:4 weight, each on plain tensors (a ``SparseWeight``'s fields).

- ``dense``:      the weight unpacked once (exact); F.linear. Everywhere.
- ``cusparselt``: ``torch._cslt_compress`` once, ``torch._cslt_sparse_mm`` per call. CUDA sm80+.
- ``cutlass``:    torch's CUTLASS semi-structured layout (packed + meta), ``torch._sparse_semi_structured_mm``.
- ``cpu_sparse``: mixsparse's native CPU kernel (runtime/cpu_sparse.py): the weight stays compressed
  (kept values + bitmask + row offsets); built by ``make install``. Any shape, float32/bfloat16/float16.
  Its C++ op is called by ``runtime.sparse_linear.sparse_linear`` itself; ``linear`` here runs the others.

The sparse layouts are device-specific and never written to disk. Capabilities are checked once per
process and device: compute capability, the op schemas (they changed across torch versions), and a
numeric self-test against a dense matmul; a backend failing any of them is disabled with one warning.
Inputs are padded to the kernels' row multiple with static shapes only (no host syncs), so the ops can
be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from mixsparse.runtime import cpu_sparse
from mixsparse.runtime.weight import CPU_SPARSE, CUSPARSELT, CUTLASS, DENSE, SparseWeight

log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ShapeLimits:
    min_rows: int  # sparse weight: out_features multiple
    min_cols: int  # sparse weight: in_features multiple
    dense_rows: int  # the activation's token count is padded to this multiple


# torch.sparse._DTYPE_SHAPE_CONSTRAINTS for fp16/bf16 (both backends)
LIMITS = ShapeLimits(min_rows=32, min_cols=64, dense_rows=8)


def shape_supported(out_features: int, in_features: int) -> bool:
    return out_features % LIMITS.min_rows == 0 and in_features % LIMITS.min_cols == 0


def _has_arguments(op, names: set[str]) -> bool:
    try:
        schema = op.default._schema
    except (AttributeError, RuntimeError):
        return False
    return names <= {argument.name for argument in schema.arguments}


def _pad_rows(x2d: torch.Tensor) -> torch.Tensor:
    missing = (-x2d.shape[0]) % LIMITS.dense_rows
    return torch.nn.functional.pad(x2d, (0, 0, 0, missing)) if missing else x2d


def compress(backend: str, dense: torch.Tensor) -> SparseWeight:
    """A sparse dense weight already on its device, in ``backend``'s layout."""
    shape = tuple(dense.shape)
    if backend == DENSE:
        return SparseWeight(DENSE, dense.contiguous(), shape)
    if backend == CPU_SPARSE:
        return cpu_sparse.from_dense(dense)
    if backend == CUSPARSELT:
        return SparseWeight(CUSPARSELT, torch._cslt_compress(dense.contiguous()), shape)
    if backend == CUTLASS:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS

        wrapped = SparseSemiStructuredTensorCUTLASS.from_dense(dense.contiguous())
        return SparseWeight(CUTLASS, wrapped.packed, shape, meta=wrapped.meta)
    raise ValueError(f"unknown backend {backend!r}")


def linear(
    backend: str,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """y = x Wᵀ + b for x of shape (..., in_features) on the dense, cuSPARSELt or CUTLASS backend."""
    if backend == DENSE:
        return torch.nn.functional.linear(x, values, bias)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    tokens = x2d.shape[0]
    padded = _pad_rows(x2d)
    if backend == CUSPARSELT:
        # (N,K)·(K,M) with the result transposed in the epilogue: (M, N) without an extra copy
        y = torch._cslt_sparse_mm(values, padded.t(), transpose_result=True)
    elif backend == CUTLASS:
        y = torch._sparse_semi_structured_mm(values, meta, padded.t()).t()
    else:  # the CPU kernel's weight has no meta: sparse_linear calls its C++ op instead
        raise ValueError(f"backend {backend!r} does not run through this op")
    y = y[:tokens]
    if bias is not None:
        y = y + bias
    return y.reshape(*leading, out_features)


@functools.lru_cache(maxsize=None)
def available(device: str) -> tuple[str, ...]:
    """Backends that work on ``device`` (e.g. "cuda:0"), checked once: dense always comes last."""
    device = torch.device(device)
    if device.type == "cpu":
        return (DENSE,) if cpu_sparse.unavailable_reason() else (CPU_SPARSE, DENSE)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (DENSE,)
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        log.warning(
            "%s has compute capability %d.%d; 2:4 sparse kernels need 8.0+: using the exact dense fallback",
            torch.cuda.get_device_name(device),
            major,
            minor,
        )
        return (DENSE,)
    found = []
    checks = {
        CUSPARSELT: lambda: (
            hasattr(torch, "_cslt_compress")
            and _has_arguments(torch.ops.aten._cslt_sparse_mm, {"compressed_A", "dense_B", "transpose_result"})
        ),
        CUTLASS: lambda: hasattr(torch, "_sparse_semi_structured_mm"),
    }
    for backend, has_op in checks.items():
        if not has_op():
            log.warning(
                "torch %s lacks the %s op (or its schema changed); backend disabled", torch.__version__, backend
            )
            continue
        problem = _self_test(backend, device)
        if problem:
            log.warning("2:4 backend %s disabled on %s: %s", backend, device, problem)
        else:
            found.append(backend)
    return (*found, DENSE)


def _self_test(backend: str, device: torch.device) -> str | None:
    """Compare with a dense matmul on random data (odd token count, bias) before trusting a backend."""
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        groups = torch.randn(128, 64, 4, generator=generator)
        keep = torch.zeros_like(groups).scatter_(-1, groups.abs().topk(2, dim=-1).indices, 1.0)
        weight = (groups * keep).reshape(128, 256).to(device, torch.bfloat16)
        x = torch.randn(2, 13, 256, generator=generator).to(device, torch.bfloat16)
        bias = torch.randn(128, generator=generator).to(device, torch.bfloat16)
        prepared = compress(backend, weight)
        got = linear(backend, x, prepared.values, prepared.meta, bias, 128).float()
        want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        error = ((got - want).norm() / want.norm()).item()
    except Exception as exception:  # any failure means: do not use it
        return f"{type(exception).__name__}: {exception}"
    return None if error < 2e-2 else f"relative error {error:.3g} against a dense matmul"
