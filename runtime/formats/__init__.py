"""On-disk formats: the packed 2:4 weight, the bitmask-compressed weight and the artifact directory."""

from mixsparse.runtime.formats.bitmask import Bitmask
from mixsparse.runtime.formats.packed24 import Packed24

__all__ = ["Bitmask", "Packed24"]
