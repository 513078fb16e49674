"""The one sparse-linear entry point: a weight prepared once for its device, the function that runs it,
and the nn.Module that holds it.

``prepare`` turns a packed 2:4 or bitmask weight into a ``SparseWeight`` (runtime/weight.py);
``sparse_linear(x, weight, bias)`` runs it, on the CPU kernel's op, the registered CUDA/dense op, or the
exact dense fallback; ``SparseLinear`` and the vLLM plugin keep the weight object from load on and call
``sparse_linear``, nothing else.

On CPU, ``prepare`` converts the artifact's values/meta straight into the native kernel's compressed
layout (never unpacked, same bytes as on disk); where the kernels are not built, the exact dense fallback
(one warning). On CUDA it unpacks on the device, then compresses into the backend chosen for the shape:
on sm80+ the faster of cuSPARSELt and CUTLASS (or dense, if both lose) by a one-time timing search whose
result is cached per GPU, torch version, shape and dtype; for shapes below the kernels' minimums (one
warning per shape) or older GPUs, the exact dense fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import torch
from torch import nn

from mixsparse.runtime import cpu_sparse, kernels, ops
from mixsparse.runtime.atomic import atomic_file
from mixsparse.runtime.cache import cache_dir
from mixsparse.runtime.formats.bitmask import Bitmask
from mixsparse.runtime.formats.packed24 import Packed24
from mixsparse.runtime.weight import BACKEND_IDS, CPU_SPARSE, DENSE, SparseWeight

log = logging.getLogger(__name__)

TUNING_TOKENS = (16, 256, 2048)  # decode-, mixed- and prefill-like token counts
_CPU_SPARSE_ID = BACKEND_IDS[CPU_SPARSE]


def sparse_linear(x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ + b for x of shape (..., in_features), whatever backend ``weight`` was prepared for.

    Only plain tensors reach the registered ops, so this traces under torch.compile and captures in CUDA
    graphs. A cpu_sparse weight needs the native kernels loaded (``prepare`` only makes one where they are).
    """
    if weight.backend_id == _CPU_SPARSE_ID:
        # its C++ op directly: a Python op layer would cost every layer of every decode step
        return torch.ops.mixsparse_cpu.sparse_linear(
            x, weight.values, weight.mask, weight.offsets, bias, weight.shape[0]
        )
    return ops.sparse_linear(x, weight.values, weight.meta, bias, weight.shape[0], weight.backend_id)


@functools.lru_cache(maxsize=None)
def _warn_unsupported(shape: tuple[int, int]) -> None:
    log.warning(
        "2:4 kernels need out %% %d == 0 and in %% %d == 0; shape %s runs on the exact dense fallback",
        kernels.LIMITS.min_rows,
        kernels.LIMITS.min_cols,
        list(shape),
    )


def candidates(device: torch.device, shape: tuple[int, int], dtype: torch.dtype) -> tuple[str, ...]:
    backends = kernels.available(str(device))
    if backends == (DENSE,):
        return backends
    if device.type == "cpu":
        if dtype not in cpu_sparse.DTYPES:
            log.warning(
                "CPU sparse kernels take float32/bfloat16/float16, not %s: using the exact dense fallback", dtype
            )
            return (DENSE,)
        return backends  # any shape
    if dtype not in kernels.SPARSE_DTYPES:
        log.warning("2:4 kernels take float16/bfloat16, not %s: using the exact dense fallback", dtype)
        return (DENSE,)
    if not kernels.shape_supported(*shape):
        _warn_unsupported(tuple(shape))
        return (DENSE,)
    return backends


def prepare(
    packed: Packed24 | Bitmask, device: str | torch.device, dtype: torch.dtype | None = None, backend: str = "auto"
) -> SparseWeight:
    """A packed 2:4 or bitmask weight ready for its device: compressed on the CPU kernel, else as below."""
    device = torch.device(device)
    dtype = dtype or packed.dtype
    if isinstance(packed, Bitmask):
        return _prepare_bitmask(packed, device, dtype, backend)
    options = candidates(device, packed.shape, dtype)
    if backend == "auto" and device.type == "cpu":
        backend = options[0]  # the CPU kernel picks streaming or tiles per call: nothing to time here
    if backend == CPU_SPARSE and backend in options:
        return cpu_sparse.from_packed24(packed.values.cpu(), packed.meta.cpu(), packed.shape, dtype)
    dense = Packed24(packed.values.to(device), packed.meta.to(device), packed.shape).unpack().to(dtype)
    if backend == "auto":
        backend = choose(dense, options) if len(options) > 1 else options[0]
    elif backend not in options:
        raise ValueError(f"backend {backend!r} is not available here (available: {', '.join(options)})")
    return kernels.compress(backend, dense)


def _prepare_bitmask(weight: Bitmask, device: torch.device, dtype: torch.dtype, backend: str) -> SparseWeight:
    """Any sparsity: the CPU kernel where it runs, else the exact dense fallback (the CUDA kernels take 2:4 only)."""
    options = candidates(device, weight.shape, dtype) if device.type == "cpu" else (DENSE,)
    if backend == "auto":
        backend = options[0]
    elif backend not in options:
        raise ValueError(f"backend {backend!r} is not available here (available: {', '.join(options)})")
    if backend == CPU_SPARSE:
        return weight.to_rows(dtype)
    return SparseWeight(DENSE, weight.unpack().to(device, dtype), weight.shape)


def _tuning_file(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return str(cache_dir() / "kernels" / f"{name}-torch{torch.__version__}.json")


def choose(dense: torch.Tensor, options: tuple[str, ...]) -> str:
    """The fastest backend for this weight's shape, timed once and cached per device and torch version."""
    key = f"{dense.shape[0]}x{dense.shape[1]}:{str(dense.dtype).removeprefix('torch.')}"
    path = _tuning_file(dense.device)
    try:
        with open(path) as handle:
            table = json.load(handle)
    except (OSError, json.JSONDecodeError):
        table = {}
    if table.get(key, {}).get("backend") in options:
        return table[key]["backend"]
    timings = {backend: time_backend(backend, dense) for backend in options}
    # each backend's time relative to dense, summed over the token counts: no single regime dominates
    score = {b: sum(t / d for t, d in zip(times, timings[DENSE])) for b, times in timings.items()}
    best = min(score, key=score.get)
    table[key] = {
        "backend": best,
        "tokens": list(TUNING_TOKENS),
        "milliseconds": {b: [round(t, 4) for t in times] for b, times in timings.items()},
    }
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(table, indent=1))
    log.info("2:4 %s: %s (%s)", key, best, {b: round(s, 3) for b, s in score.items()})
    return best


def time_backend(backend: str, dense: torch.Tensor, repeats: int = 20) -> list[float]:
    """Median milliseconds of y = x Wᵀ at each of TUNING_TOKENS, with CUDA events, after warm-up."""
    # the backend's own GEMM, not the registered op around it: the choice is between kernels
    weight = kernels.compress(backend, dense)
    results = []
    for tokens in TUNING_TOKENS:
        x = torch.randn(tokens, dense.shape[1], device=dense.device, dtype=dense.dtype)
        for _ in range(3):
            kernels.linear(backend, x, weight.values, weight.meta, None, dense.shape[0])
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            kernels.linear(backend, x, weight.values, weight.meta, None, dense.shape[0])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        results.append(sorted(times)[len(times) // 2])
    return results


class SparseLinear(nn.Module):
    """Drop-in for nn.Linear with a prepared weight; forward is ``sparse_linear``.

    The weight's tensors are also buffers (named as its fields), so ``.to()``, ``buffers()`` and resident
    byte counts see them; ``_apply`` keeps the weight object on the buffers ``.to()`` leaves behind.
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.backend = weight.backend
        self.out_features, self.in_features = weight.shape
        for name, tensor in weight.tensors.items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias)
        self.sparse_weight = weight

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.sparse_weight = dataclasses.replace(
            self.sparse_weight, **{name: getattr(self, name) for name in SparseWeight.TENSORS}
        )
        return self

    @property
    def resident_bytes(self) -> int:
        return self.sparse_weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.sparse_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"
