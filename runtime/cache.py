"""Where mixsparse keeps what it fetches or measures once: models, perplexities, kernel timings."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MIXSPARSE_CACHE, or ~/.cache/mixsparse."""
    return Path(os.environ.get("MIXSPARSE_CACHE") or Path.home() / ".cache" / "mixsparse")
