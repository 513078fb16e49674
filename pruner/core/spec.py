"""What to do with one module: keep it dense, prune it to a ratio, or to N:M."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mixsparse.runtime.errors import MixsparseError

DENSE, UNSTRUCTURED, NM = "dense", "unstructured", "nm"
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Spec:
    kind: str
    sparsity: float = 0.0  # fraction of weights removed (for N:M: 1 - n/m)
    n: int = 0
    m: int = 0

    @classmethod
    def dense(cls) -> "Spec":
        return cls(DENSE)

    @classmethod
    def unstructured(cls, sparsity: float) -> "Spec":
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise MixsparseError(f"sparsity {sparsity:g} is outside [0, 1)")
        return cls(UNSTRUCTURED, sparsity) if sparsity > 0 else cls.dense()

    @classmethod
    def nm(cls, n: int, m: int) -> "Spec":
        if not 0 < n < m:
            raise MixsparseError(f"N:M sparsity {n}:{m} needs 0 < N < M")
        return cls(NM, 1.0 - n / m, n, m)

    @classmethod
    def parse(cls, text: "str | float | Spec") -> "Spec":
        """``"dense"``, a ratio such as ``"0.7"``, or ``"N:M"`` such as ``"2:4"``."""
        if isinstance(text, Spec):
            return text
        if isinstance(text, (int, float)):
            return cls.unstructured(text)
        text = str(text).strip()
        if text.lower() == DENSE:
            return cls.dense()
        match = _NM.match(text)
        if match:
            return cls.nm(int(match.group(1)), int(match.group(2)))
        try:
            value = float(text)
        except ValueError:
            raise MixsparseError(
                f"cannot read sparsity {text!r}: expected a ratio in [0, 1) such as 0.5, N:M such as 2:4, or 'dense'"
            ) from None
        return cls.unstructured(value)

    def __str__(self) -> str:
        if self.kind == NM:
            return f"{self.n}:{self.m}"
        if self.kind == UNSTRUCTURED:
            return repr(self.sparsity)  # exact: plan budgets must survive a round trip through JSON
        return DENSE

    @property
    def is_dense(self) -> bool:
        return self.kind == DENSE

    @property
    def is_24(self) -> bool:
        return self.kind == NM and (self.n, self.m) == (2, 4)

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        if self.kind == NM and shape[1] % self.m:
            raise MixsparseError(f"module {name}: input size {shape[1]} is not a multiple of M={self.m} for {self}")
