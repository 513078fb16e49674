"""A linear layer's weight prepared for one GEMM backend: named plain tensors, built once at load.

Plain tensors (no tensor subclass), so what reaches the registered ops is what vLLM's compile path and
CUDA graphs can take. The weight object is built once and kept on the layer: the forward only reads its
fields (``runtime.sparse_linear.sparse_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

DENSE, CUSPARSELT, CUTLASS, CPU_SPARSE = "dense", "cusparselt", "cutlass", "cpu_sparse"
# the registered op's backend argument
BACKEND_IDS = {DENSE: 0, CUSPARSELT: 1, CUTLASS: 2, CPU_SPARSE: 3}
_NEEDS = {DENSE: (), CUSPARSELT: (), CUTLASS: ("meta",), CPU_SPARSE: ("mask", "offsets")}


@dataclass(frozen=True, slots=True, eq=False)
class SparseWeight:
    """W of shape (out_features, in_features) in ``backend``'s layout.

    - ``values``:  dense: W itself; cpu_sparse: the kept weights of each row in column order, rows one
      after another (flat); cusparselt: torch's compressed matrix; cutlass: the kept values (out, in/2);
    - ``meta``:    cutlass: the 2:4 metadata (which 2 of every 4 columns are kept);
    - ``mask``:    cpu_sparse: the bitmask, (out, ceil(in/8)) uint8, bit j of byte b = column 8b + j kept;
    - ``offsets``: cpu_sparse: (out + 1,) int64, row n's values are values[offsets[n]:offsets[n + 1]].
    Fields a backend does not use are None. A packed 2:4 weight on the CPU kernel is a bitmask with K/2
    values per row, so it has a ``mask``, not a ``meta``.
    """

    backend: str
    values: torch.Tensor
    shape: tuple[int, int]
    meta: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    backend_id: int = field(init=False, repr=False)

    # every tensor field (a new one, e.g. quantisation scales, is listed here too): what a layer registers
    # as buffers and what counts as resident bytes
    TENSORS: ClassVar[tuple[str, ...]] = ("values", "meta", "mask", "offsets")

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_IDS:
            raise ValueError(f"unknown backend {self.backend!r}")
        missing = [name for name in _NEEDS[self.backend] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.backend} weight needs {', '.join(missing)}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "backend_id", BACKEND_IDS[self.backend])

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in self.TENSORS}

    @property
    def nbytes(self) -> int:
        """Bytes resident on the device for this weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t is not None)
