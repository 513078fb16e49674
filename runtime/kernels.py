"""The GEMM backends for a packed 2:4 weight, each on plain tensors.

- ``dense``:      the weight unpacked once (exact); F.linear. Everywhere.
- ``cusparselt``: ``torch._cslt_compress`` once, ``torch._cslt_sparse_mm`` per call. CUDA sm80+.
- ``cutlass``:    torch's CUTLASS semi-structured layout (packed + meta), ``torch._sparse_semi_structured_mm``.
- ``cpu_sparse``: mixsparse's native CPU kernel (runtime/cpu_sparse.py): the weight stays compressed
  (kept values + bitmask + row offsets); built by ``make install``. Any shape, float32/bfloat16/float16.

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

log = logging.getLogger(__name__)

DENSE, CUSPARSELT, CUTLASS, CPU_SPARSE = "dense", "cusparselt", "cutlass", "cpu_sparse"
BACKEND_IDS = {DENSE: 0, CUSPARSELT: 1, CUTLASS: 2, CPU_SPARSE: 3}
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


def compress(backend: str, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, meta, offsets) in ``backend``'s layout for a sparse dense weight already on its device."""
    if backend == DENSE:
        return dense.contiguous(), None, None
    if backend == CPU_SPARSE:
        rows = cpu_sparse.from_dense(dense)
        return rows.values, rows.mask, rows.offsets
    if backend == CUSPARSELT:
        return torch._cslt_compress(dense.contiguous()), None, None
    if backend == CUTLASS:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS

        wrapped = SparseSemiStructuredTensorCUTLASS.from_dense(dense.contiguous())
        return wrapped.packed, wrapped.meta, None
    raise ValueError(f"unknown backend {backend!r}")


def linear(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    meta: torch.Tensor | None,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """y = x Wᵀ + b for x of shape (..., in_features)."""
    if backend == DENSE:
        return torch.nn.functional.linear(x, weight, bias)
    if backend == CPU_SPARSE:
        return torch.ops.mixsparse_cpu.sparse_linear(x, weight, offsets, meta, bias, out_features)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    tokens = x2d.shape[0]
    padded = _pad_rows(x2d)
    if backend == CUSPARSELT:
        # (N,K)·(K,M) with the result transposed in the epilogue: (M, N) without an extra copy
        y = torch._cslt_sparse_mm(weight, padded.t(), transpose_result=True)
    else:
        y = torch._sparse_semi_structured_mm(weight, meta, padded.t()).t()
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
        packed, meta, offsets = compress(backend, weight)
        got = linear(backend, x, packed, meta, offsets, bias, 128).float()
        want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        error = ((got - want).norm() / want.norm()).item()
    except Exception as exception:  # any failure means: do not use it
        return f"{type(exception).__name__}: {exception}"
    return None if error < 2e-2 else f"relative error {error:.3g} against a dense matmul"
