"""The native CPU kernels for compressed sparse weights (``torch.ops.mixsparse_cpu.sparse_linear``).

Built by ``make install`` from csrc/cpu (setup.py); this module loads them once, says why when it cannot,
and converts weights into the layout they read, a ``SparseWeight`` of backend cpu_sparse: per row the kept
values in column order (rows one after another), a bitmask (bit j of byte b = column 8b + j), and row
offsets into the values. Layers run it through ``runtime.sparse_linear.sparse_linear``. A packed 2:4
weight converts without ever being unpacked: its values are already the kept weights in column order,
and each meta nibble ``i0 | i1 << 2`` becomes the mask nibble ``1 << i0 | 1 << i1`` at the same place,
so the prepared weight has the artifact's size (56.25% of dense in bf16/fp16).

The kernel chooses per call: few tokens stream the compressed rows (decode, W never materialised), many
tokens expand row tiles into a dense buffer for a dense GEMM (prefill). The instruction set (AVX-512 with
BF16 + VBMI2, else portable C++) is chosen once per process from what the CPU reports.
``MIXSPARSE_CPU_KERNELS=0`` turns them off (the exact dense fallback then runs).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats.bitmask import Bitmask  # the one pack/unpack of this layout
from mixsparse.runtime.weight import CPU_SPARSE, SparseWeight

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SWITCH = "MIXSPARSE_CPU_KERNELS"


@functools.lru_cache(maxsize=None)
def load():
    """(extension module or None, why not). Tried once per process."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"{SWITCH}=0"
    try:
        from mixsparse.runtime import _cpu_sparse
    except ImportError as error:  # not built (no compiler at install), or built for another torch
        return None, (
            f"the native CPU kernels are not built ({error}); run `make install` (it needs g++ and the Python headers)"
        )
    _register_fake()
    return _cpu_sparse, None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when the kernels run here; else the reason, warned about once per process."""
    module, reason = load()
    if module is None:
        log.warning("mixsparse: sparse layers run on the exact dense fallback on CPU: %s", reason)
    return reason


def isa() -> str | None:
    """'avx512' or 'portable': the variant the op runs on this CPU (None without the kernels)."""
    module, _ = load()
    return module.isa() if module is not None else None


def _register_fake() -> None:
    @torch.library.register_fake("mixsparse_cpu::sparse_linear")
    def _(x, values, mask, offsets, bias, out_features):
        return x.new_empty((*x.shape[:-1], out_features))


def compressed(values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, shape: tuple[int, int]) -> SparseWeight:
    """The kernel's weight from its three tensors (contiguous, as the op requires)."""
    return SparseWeight(CPU_SPARSE, values.contiguous(), shape, mask=mask.contiguous(), offsets=offsets.contiguous())


def _nibble_table() -> torch.Tensor:
    """meta byte (two 2:4 nibbles i0 | i1 << 2) -> mask byte (two nibbles 1 << i0 | 1 << i1)."""
    table = torch.zeros(256, dtype=torch.uint8)
    for byte in range(256):
        out = 0
        for shift in (0, 4):
            nibble = (byte >> shift) & 0xF
            first, second = nibble & 3, nibble >> 2
            if first < second:  # an invalid nibble (the zero padding of an odd group count) keeps nothing
                out |= ((1 << first) | (1 << second)) << shift
        table[byte] = out
    return table


_TABLE = _nibble_table()


def from_packed24(
    values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None
) -> SparseWeight:
    """The kernel layout of a packed 2:4 weight (values (out, in/2), meta (out, ceil(in/8))), no dense copy."""
    out_features, in_features = shape
    dtype = dtype or values.dtype
    if dtype not in DTYPES:
        raise MixsparseError(f"CPU sparse kernels take float32, bfloat16 or float16, not {dtype}")
    mask = _TABLE[meta.to(torch.long)]
    if in_features % 8:  # in/4 odd: the last byte holds one group, its high nibble must stay empty
        mask[:, -1] &= 0x0F
    offsets = torch.arange(out_features + 1, dtype=torch.int64) * (in_features // 2)
    return compressed(values.to(dtype).reshape(-1), mask, offsets, (out_features, in_features))


def from_dense(weight: torch.Tensor, dtype: torch.dtype | None = None) -> SparseWeight:
    """The kernel layout of any dense weight: its non-zeros are kept (tests and benchmarks use this)."""
    return Bitmask.pack(weight.to(dtype or weight.dtype)).to_rows()


def unpack(weight: SparseWeight) -> torch.Tensor:
    """The dense weight (exact): for checks, never on the serving path."""
    return Bitmask.from_rows(weight).unpack()


def join(parts: list[SparseWeight]) -> SparseWeight:
    """Row blocks stacked into one weight (vLLM's fused q/k/v and gate/up): one kernel call for the group."""
    if len(parts) == 1:
        return parts[0]
    in_features = {p.shape[1] for p in parts}
    if len(in_features) != 1 or len({p.values.dtype for p in parts}) != 1:
        raise MixsparseError(
            f"cannot join weights of inputs {sorted(in_features)} / dtypes "
            f"{sorted({str(p.values.dtype) for p in parts})}"
        )
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + part.values.numel())
    offsets = torch.cat(
        [part.offsets[:-1] + start for part, start in zip(parts, starts)]
        + [torch.tensor([starts[-1]], dtype=torch.int64)]
    )
    return compressed(
        torch.cat([p.values for p in parts]),
        torch.cat([p.mask for p in parts]),
        offsets,
        (sum(p.shape[0] for p in parts), in_features.pop()),
    )
