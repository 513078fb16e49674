"""On-disk formats: the packed 2:4 weight and the artifact directory."""

from mixsparse.runtime.formats.packed24 import Packed24

__all__ = ["Packed24"]
