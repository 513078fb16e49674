"""The bitmask-compressed weight: any sparsity (unstructured or N:M), exact in both directions.

Layout for a dense W of shape (out, in), any ``in`` (see docs/design.md, Formats); it is exactly what the
native CPU kernel reads (csrc/cpu/sparse_kernels.h), so a loaded weight needs no conversion there:
- ``values``:  (nnz,), W's dtype: the non-zero weights of each row in column order, rows one after another;
- ``mask``:    (out, ceil(in/8)), uint8: bit j of byte b (LSB first) is set when column 8b + j is kept;
  the bits past column ``in - 1`` in a row's last byte are 0;
- ``offsets``: (out + 1,), int64: row n's values are ``values[offsets[n]:offsets[n + 1]]``; offsets[0] = 0,
  offsets[out] = nnz, and each row's span equals the popcount of its mask bytes.
At sparsity s a bf16 layer costs (1 - s)·2 + 1/8 + 8/in bytes per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.weight import CPU_SPARSE, SparseWeight

_BITS = torch.arange(8, dtype=torch.uint8)


def _popcount(bytes_: torch.Tensor) -> torch.Tensor:
    """Set bits per uint8 element, computed in uint8 (no widened copy of a large mask)."""
    x = bytes_ - ((bytes_ >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@dataclass(frozen=True)
class Bitmask:
    values: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, dense: torch.Tensor, name: str = "weight") -> "Bitmask":
        """Keep every non-zero of a 2-D floating weight; the pruned positions must be exact zeros."""
        if dense.dim() != 2:
            raise MixsparseError(f"{name}: bitmask packing needs a 2-D weight, got shape {tuple(dense.shape)}")
        if not dense.is_floating_point():
            raise MixsparseError(f"{name}: bitmask packing needs a floating weight, got {dense.dtype}")
        out_features, in_features = dense.shape
        keep = dense != 0
        padded = torch.nn.functional.pad(keep, (0, (-in_features) % 8)).reshape(out_features, -1, 8)
        mask = (padded.to(torch.uint8) << _BITS.to(dense.device)).sum(-1, dtype=torch.uint8)
        offsets = torch.zeros(out_features + 1, dtype=torch.int64, device=dense.device)
        offsets[1:] = keep.sum(1).cumsum(0)
        return cls(dense[keep].contiguous(), mask.contiguous(), offsets, (out_features, in_features))

    @classmethod
    def from_tensors(
        cls, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, shape, name: str = "weight"
    ) -> "Bitmask":
        """Wrap tensors read from disk, checking that they are a consistent bitmask packing of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if values.dim() != 1 or not values.is_floating_point():
            raise MixsparseError(
                f"{name}: bitmask values must be a 1-D floating tensor, got {list(values.shape)} {values.dtype}"
            )
        nnz = cls.check_index(mask, offsets, shape, name)
        if values.numel() != nnz:
            raise MixsparseError(f"{name}: bitmask values hold {values.numel()} weights but the mask keeps {nnz}")
        return cls(values, mask, offsets, shape)

    @classmethod
    def check_index(cls, mask: torch.Tensor, offsets: torch.Tensor, shape, name: str = "weight") -> int:
        """Check ``mask`` and ``offsets`` against ``shape`` and each other; the number of kept weights."""
        out_features, in_features = (int(s) for s in shape)
        expected_mask = (out_features, (in_features + 7) // 8)
        if tuple(mask.shape) != expected_mask or tuple(offsets.shape) != (out_features + 1,):
            raise MixsparseError(
                f"{name}: bitmask tensors do not match shape {[out_features, in_features]}: mask "
                f"{list(mask.shape)} (expected {list(expected_mask)}), offsets {list(offsets.shape)} "
                f"(expected {[out_features + 1]})"
            )
        if mask.dtype != torch.uint8 or offsets.dtype != torch.int64:
            raise MixsparseError(
                f"{name}: bitmask mask must be uint8 and offsets int64, got {mask.dtype} and {offsets.dtype}"
            )
        if in_features % 8 and mask.numel() and bool((mask[:, -1] >> (in_features % 8)).any()):
            row = int((mask[:, -1] >> (in_features % 8)).nonzero()[0])
            raise MixsparseError(
                f"{name}: bitmask row {row} keeps columns past the input size {in_features} (corrupt artifact?)"
            )
        counts = _popcount(mask).sum(1, dtype=torch.int64)
        expected = torch.zeros_like(offsets)
        expected[1:] = counts.cumsum(0)
        if not torch.equal(offsets, expected):
            row = int((offsets != expected).nonzero()[0])
            raise MixsparseError(
                f"{name}: bitmask offsets disagree with the mask at entry {row} "
                f"({int(offsets[row])}, the mask's bits give {int(expected[row])}; corrupt "
                f"artifact?)"
            )
        return int(expected[-1])

    def unpack(self) -> torch.Tensor:
        """The dense weight, with zeros in the pruned positions; exact inverse of ``pack``."""
        out_features, in_features = self.shape
        bits = ((self.mask.unsqueeze(-1) >> _BITS.to(self.mask.device)) & 1).bool()
        keep = bits.reshape(out_features, -1)[:, :in_features]
        dense = torch.zeros(out_features, in_features, dtype=self.values.dtype, device=self.values.device)
        dense[keep] = self.values
        return dense

    @staticmethod
    def stored_nbytes(shape, nnz: int, element_size: int) -> int:
        """Bytes of a bitmask packing with ``nnz`` kept weights, before packing (the storage choice)."""
        out_features, in_features = (int(s) for s in shape)
        return nnz * element_size + out_features * ((in_features + 7) // 8) + (out_features + 1) * 8

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.stored_nbytes(self.shape, self.nnz, self.values.element_size())

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    def to_rows(self, dtype: torch.dtype | None = None) -> SparseWeight:
        """The native CPU kernel's weight: the same three tensors, values in ``dtype`` (default: as stored)."""
        values = self.values if dtype is None else self.values.to(dtype)
        return SparseWeight(
            CPU_SPARSE, values.contiguous(), self.shape, mask=self.mask.contiguous(), offsets=self.offsets.contiguous()
        )

    @classmethod
    def from_rows(cls, weight: SparseWeight) -> "Bitmask":
        """The bitmask of a native CPU kernel's weight (the same tensors)."""
        return cls(weight.values, weight.mask, weight.offsets, tuple(weight.shape))
