"""Size-like settings (how many calibration windows, Fisher samples, and of how many tokens) checked against
the memory they imply before any model is loaded, so that a mistyped count is one line, not an allocation
failure minutes later."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixsparse.runtime.errors import MixsparseError


def machine_memory() -> int:
    """Physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hidden_size(path: str | os.PathLike) -> int | None:
    """The model's hidden size from its config.json, where ``path`` is a local model directory."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        config = config.get("text_config", config) if isinstance(config, dict) else {}
        return int(config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_windows(flag: str, windows: int, seqlen: int, hidden: int | None = None, available: int | None = None):
    """Refuse ``windows`` windows of ``seqlen`` tokens whose memory exceeds the machine's. Their token ids
    (int64) always count; with ``hidden`` (the calibration runner holds every window's input and output of
    one block at once, in float32) their hidden states count too."""
    available = machine_memory() if available is None else available
    per_token = 8 + (2 * 4 * hidden if hidden else 0)
    need = windows * seqlen * per_token
    if need > available:
        what = f"their hidden states (size {hidden}) and token ids" if hidden else "their token ids"
        raise MixsparseError(
            f"{flag} {windows}: {windows} windows of {seqlen} tokens need {_size(need)} for {what} alone; "
            f"this machine has {_size(available)} of memory"
        )


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} EiB"
