"""The packed 2:4 weight: values plus 2-bit indices, exact in both directions.

Layout for a dense W of shape (out, in) with in % 4 == 0 (see docs/design.md, Formats):
- ``values``: (out, in/2), W's dtype: the two kept weights of every group of 4, in index order;
- ``meta``:   (out, ceil(in/8)), uint8: per group a nibble ``i0 | i1 << 2`` (i0 < i1), two groups
  per byte, the even group in the low nibble. When in/4 is odd the last high nibble is 0.
For bf16/fp16 this is 0.5 + 0.0625 = 56.25% of the dense bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixsparse.runtime.errors import MixsparseError

_POSITIONS = torch.arange(4)


@dataclass(frozen=True)
class Packed24:
    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, dense: torch.Tensor, name: str = "weight") -> "Packed24":
        """Pack a weight with at most 2 non-zeros in every group of 4 consecutive inputs."""
        if dense.dim() != 2:
            raise MixsparseError(f"{name}: 2:4 packing needs a 2-D weight, got shape {tuple(dense.shape)}")
        out_features, in_features = dense.shape
        if in_features % 4:
            raise MixsparseError(f"{name}: input size {in_features} is not a multiple of 4, cannot pack 2:4")
        groups = dense.reshape(out_features, in_features // 4, 4)
        nonzero = groups != 0
        bad = nonzero.sum(-1) > 2
        if bad.any():
            row, group = (int(i) for i in bad.nonzero()[0])
            raise MixsparseError(
                f"{name}: {int(bad.sum())} groups of 4 hold more than 2 non-zeros "
                f"(first at row {row}, columns {4 * group}..{4 * group + 3}); it is not 2:4 sparse"
            )
        # Prefer non-zero positions, then lower indices, so groups with <2 non-zeros pack deterministically.
        preference = nonzero.to(torch.int8) * 4 + (3 - _POSITIONS.to(dense.device)).to(torch.int8)
        index = preference.topk(2, dim=-1).indices.sort(dim=-1).values
        values = groups.gather(-1, index).reshape(out_features, in_features // 2)
        nibbles = (index[..., 0] | (index[..., 1] << 2)).to(torch.uint8)
        if nibbles.shape[1] % 2:
            nibbles = torch.nn.functional.pad(nibbles, (0, 1))
        meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return cls(values.contiguous(), meta.contiguous(), (out_features, in_features))

    @classmethod
    def from_tensors(cls, values: torch.Tensor, meta: torch.Tensor, shape, name: str = "weight") -> "Packed24":
        """Wrap tensors read from disk, checking that they are a consistent packing of ``shape``."""
        out_features, in_features = (int(s) for s in shape)
        expected_values = (out_features, in_features // 2)
        expected_meta = (out_features, (in_features + 7) // 8)
        if in_features % 4 or tuple(values.shape) != expected_values or tuple(meta.shape) != expected_meta:
            raise MixsparseError(
                f"{name}: packed tensors do not match shape {[out_features, in_features]}: values "
                f"{list(values.shape)} (expected {list(expected_values)}), meta {list(meta.shape)} "
                f"(expected {list(expected_meta)})"
            )
        packed = cls(values, meta, (out_features, in_features))
        cls.check_meta(meta, packed.shape, name)
        return packed

    @classmethod
    def check_meta(cls, meta: torch.Tensor, shape, name: str = "weight") -> None:
        """``meta`` is uint8 and every group's two indices are distinct and ordered (what pack writes)."""
        if meta.dtype != torch.uint8:
            raise MixsparseError(f"{name}: meta must be uint8, got {meta.dtype}")
        first, second = cls(meta.new_empty(0), meta, tuple(int(s) for s in shape))._indices()
        if not bool((first < second).all()):
            raise MixsparseError(f"{name}: meta holds invalid 2:4 indices (corrupt artifact?)")

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = self.shape
        nibbles = torch.stack([self.meta & 0xF, self.meta >> 4], dim=-1).reshape(out_features, -1)
        nibbles = nibbles[:, : in_features // 4].long()
        return nibbles & 3, nibbles >> 2

    def unpack(self) -> torch.Tensor:
        """The dense weight, with zeros in the pruned positions; bit-exact inverse of ``pack``."""
        out_features, in_features = self.shape
        first, second = self._indices()
        index = torch.stack([first, second], dim=-1)
        dense = torch.zeros(out_features, in_features // 4, 4, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(-1, index, self.values.reshape(out_features, in_features // 4, 2))
        return dense.reshape(out_features, in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()
